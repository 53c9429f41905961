"""The message history's write side (workers/history.py) with real Dramatiq workers on real
Redis: counts per queue and actor, batched (a few HINCRBYs for many messages), keys that
expire 25 h after their minute with a bounded field set, and a Redis outage that loses only
the unflushed counts and never stops processing."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq import Worker
from dramatiq.message import Message

from cli.embedded import PrivateRedis
from config.connections import Connections
from config.settings import Settings
from core.history import (
    OTHER,
    RETENTION_SECONDS,
    History,
    expires_at,
    history_key,
    read_history,
    rollup_key,
)
from workers.broker import Platform, build_broker
from workers.history import HistoryRecorder

pytestmark = pytest.mark.timeout(90)


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


def history(settings: Settings, window: Any = "1h") -> History:
    """The history as the API reads it (a fresh asyncio client)."""

    async def go() -> History:
        client = Connections(settings).redis()
        try:
            return await read_history(client, settings.redis_prefix, window)
        finally:
            await client.aclose()

    return asyncio.run(go())


def totals(settings: Settings, table: str, name: str) -> tuple[int, int]:
    series = getattr(history(settings), table).get(name)
    return (0, 0) if series is None else (sum(series.processed), sum(series.failed))


def recorder(platform: Platform) -> HistoryRecorder:
    [found] = [m for m in platform.broker.middleware if isinstance(m, HistoryRecorder)]
    return found


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis().start()
    yield server
    server.stop()


@pytest.fixture
def started() -> Iterator[list[Worker]]:
    workers: list[Worker] = []
    yield workers
    for worker in workers:
        worker.stop(timeout=10_000)


def start_worker(platform: Platform, started: list[Worker]) -> Worker:
    worker = Worker(platform.broker, worker_threads=2, worker_timeout=100)
    worker.start()
    started.append(worker)
    return worker


def test_a_real_worker_counts_processed_and_failed_in_few_writes(
    private_redis: PrivateRedis, make_settings: Any, started: list[Worker]
) -> None:
    # Broker, registry and history all on a Redis of the test's own, so its command
    # statistics count only this test's writes.
    settings = make_settings(redis_url=private_redis.url)
    platform = build_broker(Connections(settings))
    tag = uuid.uuid4().hex[:8]
    queue, ok_name, flaky_name = f"hist_{tag}", f"hist_ok_{tag}", f"hist_flaky_{tag}"
    ran: list[str] = []
    failed_once: set[int] = set()

    def ok(n: int) -> None:
        ran.append("ok")

    def flaky(n: int) -> None:
        ran.append("flaky")
        if n == -1:
            raise ValueError("always")  # thrown: dead-lettered at once
        if n not in failed_once:
            failed_once.add(n)
            raise RuntimeError("once")

    ok_actor: Any = dramatiq.actor(ok, broker=platform.broker, queue_name=queue, actor_name=ok_name)  # type: ignore[call-overload]
    flaky_actor: Any = dramatiq.actor(  # type: ignore[call-overload]
        flaky,
        broker=platform.broker,
        queue_name=queue,
        actor_name=flaky_name,
        max_retries=1,
        min_backoff=10,
        max_backoff=20,
        throws=(ValueError,),
    )
    client = redis.Redis.from_url(private_redis.url)
    try:
        client.config_resetstat()
        start_worker(platform, started)
        for n in range(100):
            ok_actor.send(n)
        flaky_actor.send(1)
        flaky_actor.send(2)
        flaky_actor.send(-1)
        # 100 ok; flaky 1 and 2 fail once then succeed (4 attempts); -1 fails once: 105
        # attempts, 3 failed.
        wait_for(lambda: totals(settings, "queues", queue) == (105, 3), "105 processed, 3 failed")
        assert totals(settings, "actors", ok_name) == (100, 0)
        assert totals(settings, "actors", flaky_name) == (5, 3)
        assert len(ran) == 105
        time.sleep(1.5)  # another flush or two: nothing is counted twice
        assert totals(settings, "queues", queue) == (105, 3)

        # Batched: per flush one HINCRBY per (minute, field) touched and per hash (the minute's
        # and its 10 minutes'); per message it would be at least 420.
        stats = client.info("commandstats")
        hincrby = stats.get("cmdstat_hincrby", {}).get("calls", 0)
        assert 0 < hincrby <= 60, stats.get("cmdstat_hincrby")
        assert recorder(platform).flushed == 105 and recorder(platform).dropped == 0

        # Every hash expires 25 h after its minute (or 10 minutes) began.
        prefix = settings.redis_prefix
        keys = {k.decode() for k in client.scan_iter(match=f"{prefix}history:*")}
        minutes = {int(k.rsplit(":", 1)[1]) for k in keys if ":10m:" not in k}
        periods = {int(k.rsplit(":", 1)[1]) for k in keys if ":10m:" in k}
        assert 1 <= len(minutes) <= 2 and periods == {m // 10 for m in minutes}
        for minute in minutes:
            key = history_key(prefix, minute)
            assert client.expiretime(key) == expires_at(minute) == minute * 60 + RETENTION_SECONDS
            assert 24 * 3600 < client.ttl(key) <= RETENTION_SECONDS
        for period in periods:
            assert client.expiretime(rollup_key(prefix, period)) == period * 600 + RETENTION_SECONDS
    finally:
        client.close()
        for worker in started:
            worker.stop(timeout=10_000)
        started.clear()
        platform.close()


def test_messages_for_undeclared_actors_add_no_fields(
    settings: Settings, platform: Platform, started: list[Worker]
) -> None:
    """Only declared names become fields: a message for an actor nobody declared is
    dead-lettered by Dramatiq's consumer before it runs (and any other name that reached the
    recorder would be counted as OTHER), so no message can grow a minute's hash."""
    tag = uuid.uuid4().hex[:8]
    queue = f"hist_{tag}"
    actor: Any = dramatiq.actor(  # type: ignore[call-overload]
        lambda: None, broker=platform.broker, queue_name=queue, actor_name=f"known_{tag}"
    )
    start_worker(platform, started)
    for n in range(5):
        platform.broker.enqueue(
            Message(queue_name=queue, actor_name=f"ghost_{tag}_{n}", args=(), kwargs={}, options={})
        )
    actor.send()
    wait_for(lambda: totals(settings, "queues", queue) == (1, 0), "the known actor counted")
    time.sleep(1.5)
    found = history(settings)
    assert sum(found.queues[queue].processed) == 1
    assert set(found.actors) == {f"known_{tag}"}
    [row] = [q for q in platform.inspector.stats() if q.queue == queue]
    assert row.dead == 5


def test_the_memory_bound_of_a_full_minute(settings: Settings, platform: Platform) -> None:
    """The largest hash a minute can hold (every declared queue and actor, plus OTHER, both
    outcomes, large counts) stays a small listpack: 1,650 of them (25 h of minutes and of
    10 minutes) are under 2 MB."""
    queues = platform.broker.get_declared_queues() | {OTHER}
    actors = set(platform.broker.actors) | {OTHER}
    fields: dict[Any, Any] = {
        f"{kind}:{name}": 10**9
        for kinds, names in ((("qp", "qf"), queues), (("ap", "af"), actors))
        for kind in kinds
        for name in names
    }
    key = history_key(settings.redis_prefix, int(time.time()) // 60)
    client = Connections(settings).redis_sync()
    try:
        client.hset(key, mapping=fields)
        assert client.object("encoding", key) == b"listpack"
        size = client.memory_usage(key)
        assert size is not None
        hashes = RETENTION_SECONDS // 60 + RETENTION_SECONDS // 600
        assert hashes == 1650
        assert size * hashes < 2 * 1024 * 1024, (len(fields), size)
    finally:
        client.delete(key)
        client.close()


def test_counts_wait_in_memory_until_a_flush_and_shutdown_flushes_them(
    settings: Settings, platform: Platform, started: list[Worker]
) -> None:
    queue = f"hist_{uuid.uuid4().hex[:8]}"
    done = threading.Semaphore(0)
    actor: Any = dramatiq.actor(  # type: ignore[call-overload]
        lambda: done.release(), broker=platform.broker, queue_name=queue, actor_name=queue
    )
    rec = recorder(platform)
    rec.interval = 3600.0  # no periodic flush during the test
    worker = start_worker(platform, started)
    for _ in range(7):
        actor.send()
    for _ in range(7):
        assert done.acquire(timeout=10)
    wait_for(lambda: rec.pending == 7, "7 attempts counted in memory")
    assert totals(settings, "queues", queue) == (0, 0)  # nothing written per message
    worker.stop(timeout=10_000)
    started.clear()
    assert rec.pending == 0 and rec.flushed == 7
    assert totals(settings, "queues", queue) == (7, 0)
    assert totals(settings, "actors", queue) == (7, 0)


class Restartable:
    """A private Redis restarted on the same port."""

    def __init__(self) -> None:
        self.server = PrivateRedis().start()

    def restart(self) -> None:
        self.server = PrivateRedis(port=self.server.port).start()


def test_a_redis_outage_loses_only_unflushed_counts_and_never_stops_processing(
    make_settings: Any, redis_url: str, started: list[Worker]
) -> None:
    history_redis = Restartable()
    # The broker stays on the session's Redis; history (and registry) on one we stop.
    settings = make_settings(redis_url=history_redis.server.url, broker_url=redis_url)
    platform = build_broker(Connections(settings))
    queue = f"hist_{uuid.uuid4().hex[:8]}"
    done = threading.Semaphore(0)

    def work(n: int) -> None:
        done.release()

    actor: Any = dramatiq.actor(work, broker=platform.broker, queue_name=queue)  # type: ignore[call-overload]
    rec = recorder(platform)
    try:
        start_worker(platform, started)
        for n in range(5):
            actor.send(n)
        wait_for(lambda: totals(settings, "queues", queue) == (5, 0), "5 counted")

        history_redis.server.stop()
        for n in range(5):
            actor.send(n)
        for _ in range(10):  # every message runs while the history's Redis is away
            assert done.acquire(timeout=10)
        wait_for(lambda: rec.dropped == 5 and rec.pending == 0, "the outage's counts dropped")

        history_redis.restart()  # empty: the private server keeps nothing
        for n in range(3):
            actor.send(n)
        wait_for(lambda: totals(settings, "queues", queue) == (3, 0), "counting resumed")
        time.sleep(1.5)
        assert totals(settings, "queues", queue) == (3, 0)  # the dropped ones never come back
        assert rec.flushed == 8 and rec.dropped == 5
    finally:
        for worker in started:
            worker.stop(timeout=20_000)
        started.clear()
        platform.close()
        history_redis.server.stop()
        broker = redis.Redis.from_url(redis_url)
        try:
            keys = list(broker.scan_iter(match=settings.redis_prefix + "*", count=1000))
            if keys:
                broker.delete(*keys)
        finally:
            broker.close()


async def test_every_process_of_taskmanager_worker_adds_to_one_history(
    ctx: Any, tmp_path: Any
) -> None:
    """Real ``taskmanager worker --processes 2``: the history is the sum of what both
    processes ran (each adds its own counts)."""
    from bson import ObjectId

    from tests.e2e.helpers import deployed_env, start, wait_until
    from workers.registry import list_workers

    settings: Settings = ctx.settings
    env = deployed_env(settings, WORKER_METRICS_PORT="0", PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    worker = start(["worker", "--processes", "2", "--threads", "2"], env, cwd=str(tmp_path))
    platform = build_broker(Connections(settings))
    client = Connections(settings).redis_sync()
    try:
        await wait_until(
            lambda: len(list_workers(client, settings.redis_prefix)) == 2,
            timeout=60,
            what="two worker processes",
            proc=worker,
        )
        refresh = platform.actors["refresh_user_cache"]
        welcome = platform.actors["send_welcome_email"]
        for _ in range(40):
            user = str(ObjectId())
            refresh.send(
                {
                    "id": str(ObjectId()),
                    "type": "user.logged_in",
                    "user_id": user,
                    "subject_id": user,
                    "created_at": "2026-01-01T00:00:00Z",
                }
            )
        welcome.send({})  # not an event: fails and is dead-lettered at once

        async def counted() -> bool:
            found = await read_history(ctx.redis, settings.redis_prefix)
            cache = found.actors.get("refresh_user_cache")
            mail = found.actors.get("send_welcome_email")
            return bool(
                cache
                and (sum(cache.processed), sum(cache.failed)) == (40, 0)
                and mail
                and (sum(mail.processed), sum(mail.failed)) == (1, 1)
            )

        deadline = time.monotonic() + 45
        while not await counted():
            assert time.monotonic() < deadline, worker.describe()
            await asyncio.sleep(0.2)
        # What the two processes say they ran (their heartbeats count successes and failures
        # apart) is what the history holds.
        live = list_workers(client, settings.redis_prefix)
        assert len(live) == 2
        assert sum(w.processed + w.failed for w in live) == 41
        found = await read_history(ctx.redis, settings.redis_prefix)
        assert sum(sum(s.processed) for s in found.queues.values()) == 41
        assert sum(sum(s.failed) for s in found.queues.values()) == 1
    finally:
        platform.close()
        client.close()
        _code, in_time = worker.stop(grace=40)
        output = worker.describe()
        worker.close()
    assert in_time, output
