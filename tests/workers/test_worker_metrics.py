"""Worker metrics (workers/metrics.py) and the queue gauges across web replicas (web/metrics.py).

- In-process workers (``taskmanager run``): the worker families appear on the web app's own
  ``/metrics``.
- ``taskmanager worker --processes 2`` (real processes, real Redis and MongoDB): its endpoint
  on WORKER_METRICS_PORT sums both processes, with non-zero values for every family.
- Two ``taskmanager web`` replicas: the queue depth summed over their exports is the true
  depth (one replica holds the exporter lease).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import dramatiq
import pytest
import redis
from bson import ObjectId
from prometheus_client.parser import text_string_to_metric_families

from cli.embedded import free_port
from config.connections import Connections
from config.settings import Settings
from tests.e2e.helpers import deployed_env, start, wait_http, wait_until
from web.keys import PLATFORM
from workers.broker import build_broker

pytestmark = pytest.mark.timeout(150)

SECRET = "metrics-secret-" + "m" * 30
COUNTERS = (
    "taskmanager_worker_messages_processed",
    "taskmanager_worker_messages_failed",
    "taskmanager_worker_messages_retried",
    "taskmanager_worker_messages_dead_lettered",
)
DURATION = "taskmanager_worker_message_duration_seconds"
IN_PROGRESS = "taskmanager_worker_messages_in_progress"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition: (sample name, labels) -> value."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def label_sets(samples: Samples, name: str) -> set[frozenset[str]]:
    """The label names ``name``'s samples carry (``le`` aside)."""
    return {frozenset(k for k, _ in ls if k != "le") for n, ls in samples if n == name}


async def scrape(url: str) -> Samples:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return parse(await resp.text())


async def until_scraped(
    url: str, ok: Callable[[Samples], bool], what: str, timeout: float
) -> Samples:
    deadline = time.monotonic() + timeout
    last: Samples = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError):
            last = await scrape(url)
            if ok(last):
                return last
        await asyncio.sleep(0.2)
    shown = {k: v for k, v in last.items() if k[0].startswith("taskmanager_worker")}
    raise AssertionError(f"timed out waiting for {what}; last worker samples: {shown}")


def check_families(samples: Samples, queue: str, actor: str) -> None:
    """Every worker family is there with labels queue and actor, and non-zero for ``actor``."""
    for name in COUNTERS:
        assert label_sets(samples, f"{name}_total") == {frozenset({"queue", "actor"})}, name
        assert value(samples, f"{name}_total", queue=queue, actor=actor) > 0, name
    assert label_sets(samples, f"{DURATION}_bucket") == {frozenset({"queue", "actor"})}
    assert value(samples, f"{DURATION}_count", queue=queue, actor=actor) > 0
    assert value(samples, f"{DURATION}_bucket", queue=queue, actor=actor, le="+Inf") > 0
    assert value(samples, f"{DURATION}_sum", queue=queue, actor=actor) > 0
    assert label_sets(samples, IN_PROGRESS) == {frozenset({"queue", "actor"})}


# -- taskmanager run: worker threads in the web process --------------------------------------


async def test_in_process_worker_families_on_the_web_metrics(
    app: Any, client: Any, worker_for: Any
) -> None:
    broker = app[PLATFORM].broker
    tag = uuid.uuid4().hex[:8]
    queue, actor_name = f"probe_{tag}", f"metrics_probe_{tag}"
    release = threading.Event()
    flaky: set[str] = set()

    def probe(mode: str) -> None:
        if mode == "block":
            release.wait(30)
        elif mode == "fail":
            raise RuntimeError("always")
        elif mode == "permanent":
            raise ValueError("never retried")
        elif mode == "flaky" and mode not in flaky:
            flaky.add(mode)
            raise RuntimeError("once")

    actor = dramatiq.actor(  # type: ignore[call-overload]
        probe,
        actor_name=actor_name,
        queue_name=queue,
        broker=broker,
        max_retries=1,
        min_backoff=20,
        max_backoff=50,
        throws=(ValueError,),
    )
    worker_for(app)
    modes = ["ok", "ok", "ok", "flaky", "fail", "permanent", "block"]
    for mode in modes:
        await asyncio.to_thread(actor.send, mode)

    async def metrics() -> Samples:
        resp = await client.get("/metrics")
        assert resp.status == 200
        return parse(await resp.text())

    deadline = time.monotonic() + 30
    labels = {"queue": queue, "actor": actor_name}
    # ok x3, flaky x2, fail x2, permanent x1 processed; block still running.
    while True:
        samples = await metrics()
        if value(samples, "taskmanager_worker_messages_processed_total", **labels) >= 8 and (
            value(samples, "taskmanager_worker_messages_dead_lettered_total", **labels) >= 2
        ):
            break
        assert time.monotonic() < deadline, {k: v for k, v in samples.items() if tag in str(k)}
        await asyncio.sleep(0.1)
    assert value(samples, IN_PROGRESS, **labels) == 1
    release.set()
    check_families(samples, queue, actor_name)
    assert value(samples, "taskmanager_worker_messages_processed_total", **labels) == 8
    assert value(samples, "taskmanager_worker_messages_failed_total", **labels) == 4
    assert value(samples, "taskmanager_worker_messages_retried_total", **labels) == 2
    assert value(samples, "taskmanager_worker_messages_dead_lettered_total", **labels) == 2
    assert value(samples, f"{DURATION}_count", **labels) == 8
    assert value(samples, "taskmanager_worker_processes") >= 1
    assert value(samples, "taskmanager_worker_threads") >= 2

    async def finished() -> bool:
        s = await metrics()
        return value(s, "taskmanager_worker_messages_processed_total", **labels) == 9

    deadline = time.monotonic() + 10
    while not await finished():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert value(await metrics(), IN_PROGRESS, **labels) == 0


# -- taskmanager worker: forked processes, one endpoint ---------------------------------------


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    return deployed_env(settings, JWT_SECRET=SECRET, **extra)


class HangingSmtp:
    """A loopback TCP server that greets no one: each connection is held until :meth:`open`,
    then closed (so the welcome email's first attempt runs until the test lets it fail)."""

    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self._open = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> HangingSmtp:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._open.set()
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"smtp://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def open(self) -> None:
        self._open.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connected.set()
        await self._open.wait()
        writer.close()


def user_event(user_id: str) -> dict[str, Any]:
    """A ``user.registered`` event as the relay sends it to actors."""
    return {
        "id": str(ObjectId()),
        "type": "user.registered",
        "user_id": user_id,
        "subject_id": user_id,
        "created_at": "2026-01-01T00:00:00Z",
    }


@pytest.fixture
async def hanging_smtp() -> AsyncIterator[HangingSmtp]:
    async with HangingSmtp() as server:
        yield server


async def test_worker_process_metrics_after_load(
    make_settings: Any, ctx: Any, tmp_path: Any, hanging_smtp: HangingSmtp
) -> None:
    """Real ``taskmanager worker --processes 2``: success (cache refreshes), a failure that is
    retried (welcome email, SMTP hangs then drops), a permanent failure (malformed message),
    a message in progress; the endpoint sums both processes."""
    from core.accounts import create_user

    settings: Settings = ctx.settings
    user = await create_user(ctx, f"m-{uuid.uuid4().hex[:6]}@example.com", "pw-12345678", "Mo")
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    env = _env(
        settings,
        SMTP_URL=hanging_smtp.url,
        WORKER_METRICS_PORT=str(port),
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path),
    )
    worker = start(["worker", "--processes", "2", "--threads", "2"], env, cwd=str(tmp_path))
    platform = build_broker(Connections(settings))
    try:
        await wait_http(worker, url, timeout=60)
        samples = await until_scraped(
            url,
            lambda s: value(s, "taskmanager_worker_processes") == 2,
            "both worker processes",
            30,
        )
        assert value(samples, "taskmanager_worker_threads") == 4
        [group] = list(tmp_path.glob("taskmanager-worker-metrics-*"))
        assert group.name == f"taskmanager-worker-metrics-{worker.pid}"

        actors = platform.actors
        welcome = actors["send_welcome_email"]
        await asyncio.to_thread(welcome.send, user_event(str(user["_id"])))
        await asyncio.wait_for(hanging_smtp.connected.wait(), 30)
        running = await until_scraped(
            url,
            lambda s: value(s, IN_PROGRESS, actor="send_welcome_email") == 1,
            "the welcome email in progress",
            15,
        )
        assert value(running, IN_PROGRESS, queue=welcome.queue_name) == 1
        hanging_smtp.open()  # the attempt fails now: it is retried
        await asyncio.to_thread(welcome.send, {})  # not an event: dead-lettered at once
        refresh = actors["refresh_user_cache"]
        for _ in range(6):
            await asyncio.to_thread(refresh.send, user_event(str(ObjectId())))

        def loaded(s: Samples) -> bool:
            return (
                value(s, "taskmanager_worker_messages_retried_total", actor="send_welcome_email")
                >= 1
                and value(
                    s, "taskmanager_worker_messages_dead_lettered_total", actor="send_welcome_email"
                )
                >= 1
                and value(
                    s, "taskmanager_worker_messages_processed_total", actor="refresh_user_cache"
                )
                >= 6
            )

        samples = await until_scraped(url, loaded, "the load to be counted", 45)
        check_families(samples, welcome.queue_name, "send_welcome_email")
        cache = {"queue": refresh.queue_name, "actor": "refresh_user_cache"}
        assert value(samples, "taskmanager_worker_messages_processed_total", **cache) == 6
        assert value(samples, "taskmanager_worker_messages_failed_total", **cache) == 0
        assert value(samples, f"{DURATION}_count", **cache) == 6
        # One file of live gauges per process: the endpoint is the group's sum.
        assert len(list(group.glob("gauge_livesum_*.db"))) == 2
        assert value(samples, "taskmanager_worker_processes") == 2
    except (AssertionError, TimeoutError) as exc:
        raise AssertionError(f"{exc!r}\n{worker.describe()}") from exc
    finally:
        platform.close()
        _code, in_time = worker.stop(grace=40)
        output = worker.describe()
        worker.close()
    assert in_time, output


# -- two web replicas, one queue export ---------------------------------------------------------


async def test_queue_depth_summed_over_two_web_replicas_is_the_true_depth(
    make_settings: Any, tmp_path: Any
) -> None:
    settings: Settings = make_settings()
    env = _env(settings)
    ports = [free_port(), free_port()]
    webs = [start(["web", "--port", str(p)], env, cwd=str(tmp_path)) for p in ports]
    platform = build_broker(Connections(settings))
    client = redis.Redis.from_url(settings.redis_url or "")
    try:
        for web_, port in zip(webs, ports, strict=True):
            await wait_http(web_, f"http://127.0.0.1:{port}/readyz", timeout=60)
        index = platform.actors["index_task"]
        for _ in range(7):
            await asyncio.to_thread(index.send, {"subject_id": "x", "user_id": "y"})
        queue = index.queue_name
        true_depth = client.llen(f"{settings.redis_prefix}dramatiq:{queue}")
        assert true_depth == 7
        for _ in range(3):  # every scrape round, whichever replica answers first
            rounds = [await scrape(f"http://127.0.0.1:{p}/metrics") for p in ports]
            total = sum(
                value(s, "taskmanager_queue_messages", queue=queue, state="ready") for s in rounds
            )
            assert total == true_depth
            assert sum(value(s, "taskmanager_queue_stats_up") for s in rounds) == 1
            objective = "taskmanager_queue_latency_objective_seconds"  # QUEUE_LATENCY_OBJECTIVES
            assert sum(value(s, objective, queue=queue) for s in rounds) == 120.0
            exporters = [s for s in rounds if value(s, "taskmanager_queue_stats_up") == 1]
            assert value(exporters[0], "taskmanager_queue_oldest_age_seconds", queue=queue) >= 0
        holder = client.get(f"{settings.redis_prefix}metrics:queue-exporter")
        assert holder is not None and f":{webs[0].pid}:".encode() in holder
    finally:
        client.close()
        platform.close()
        for web_ in webs:
            web_.close()
        await wait_until(
            lambda: all(w.popen.poll() is not None for w in webs), timeout=5, what="webs"
        )
