"""Queue operations over the real Redis broker: counts and latency, dead letters (list, replay,
purge), crash-recovery sweeps, the worker registry, and the operator CLI."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import pytest
import redis
from click.testing import CliRunner
from dramatiq import Worker
from dramatiq.message import Message

from cli.main import main
from config.connections import Connections
from config.settings import Settings
from workers.broker import Platform, build_broker
from workers.heartbeat import WorkerHeartbeat, sweep
from workers.registry import host_has_live_worker, list_workers

QUEUE = "ops_test"


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll until ``predicate()`` is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Flaky:
    """A test actor's body: fails with ``RuntimeError('boom')`` while ``failing`` is set."""

    def __init__(self) -> None:
        self.failing = threading.Event()
        self.failing.set()
        self.calls: list[tuple[Any, ...]] = []
        self.done: list[tuple[Any, ...]] = []

    def __call__(self, *args: Any) -> None:
        self.calls.append(args)
        if self.failing.is_set():
            raise RuntimeError("boom")
        self.done.append(args)


@pytest.fixture
def platform(settings: Settings) -> Iterator[Platform]:
    """A broker built as every process builds it, plus a test-only queue ``ops_test``."""
    p = build_broker(Connections(settings))
    yield p
    p.broker.close()


@pytest.fixture
def flaky(platform: Platform) -> tuple[Flaky, dramatiq.Actor[Any, Any]]:
    body = Flaky()

    def flaky_actor(*args: Any) -> None:
        body(*args)

    actor = dramatiq.actor(
        flaky_actor, broker=platform.broker, queue_name=QUEUE, actor_name="flaky", max_retries=0
    )
    return body, actor


@pytest.fixture
def run_worker(platform: Platform) -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []

    def start(**kwargs: Any) -> Worker:
        worker = Worker(platform.broker, worker_threads=1, worker_timeout=100, **kwargs)
        worker.start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop(timeout=10_000)


def stats_of(platform: Platform, queue: str) -> Any:
    [row] = [s for s in platform.inspector.stats() if s.queue == queue]
    return row


def test_counts_ready_delayed_in_progress_and_latency(platform: Platform) -> None:
    actor = platform.actors["send_welcome_email"]
    queue = actor.queue_name
    for i in range(3):
        actor.send({"user_id": f"u{i}"})
    actor.send_with_options(args=({"user_id": "later"},), delay=60_000)

    s = stats_of(platform, queue)
    assert (s.ready, s.delayed, s.in_progress, s.dead) == (3, 1, 0, 0)

    # A worker's fetch moves a message from ready to in progress until it is acked.
    consumer = platform.broker.consume(queue, prefetch=1, timeout=100)
    message = wait_for(lambda: next(consumer), what="a fetched message")
    s = stats_of(platform, queue)
    assert (s.ready, s.in_progress) == (2, 1)
    consumer.ack(message)
    s = stats_of(platform, queue)
    assert (s.ready, s.in_progress) == (2, 0)
    consumer.close()


def test_latency_is_the_age_of_the_next_message(platform: Platform) -> None:
    actor = platform.actors["send_welcome_email"]
    now = int(time.time() * 1000)
    old = Message(
        queue_name=actor.queue_name,
        actor_name=actor.actor_name,
        args=({"user_id": "x"},),
        kwargs={},
        options={},
        message_timestamp=now - 5_000,
    )
    platform.broker.enqueue(old)
    actor.send({"user_id": "y"})
    s = stats_of(platform, actor.queue_name)
    assert 5.0 <= s.oldest_age_seconds < 60
    empty = [q for q in platform.inspector.stats() if q.queue != actor.queue_name]
    assert empty
    assert all(q.oldest_age_seconds == 0 and q.ready == 0 for q in empty)


def test_dead_letters_list_retry_and_purge(
    platform: Platform, flaky: tuple[Flaky, Any], run_worker: Callable[..., Worker]
) -> None:
    body, actor = flaky
    inspector = platform.inspector
    for i in range(3):
        actor.send(i, "x")
    run_worker()
    wait_for(lambda: stats_of(platform, QUEUE).dead == 3, what="three dead letters")
    assert len(body.calls) == 3
    assert body.done == []

    page = inspector.dead(QUEUE, limit=2)
    assert len(page.items) == 2
    assert page.next_cursor is not None
    rest = inspector.dead(QUEUE, limit=2, cursor=page.next_cursor)
    assert rest.next_cursor is None
    items = page.items + rest.items
    assert sorted(m.args[0] for m in items) == [0, 1, 2]
    assert len({m.id for m in items}) == 3
    first = items[0]
    assert first.actor == "flaky"
    assert first.queue == QUEUE
    assert first.args[1] == "x"
    assert first.error == "RuntimeError: boom"
    assert first.traceback is not None
    assert "RuntimeError: boom" in first.traceback
    assert first.failed_at is not None
    assert first.failed_at >= first.enqueued_at

    # Replay one, now that the actor succeeds: it runs once, with a fresh attempt count.
    body.failing.clear()
    result = inspector.retry(QUEUE, [first.id])
    assert (result.retried, result.not_found) == (1, [])
    wait_for(lambda: body.done, what="the replayed message")
    assert body.done == [tuple(first.args)]
    # Twice is harmless: the dead letter is gone, nothing is enqueued again.
    again = inspector.retry(QUEUE, [first.id])
    assert (again.retried, again.not_found) == (0, [first.id])
    assert stats_of(platform, QUEUE).dead == 2

    # Replay all.
    assert inspector.retry(QUEUE).retried == 2
    wait_for(lambda: len(body.done) == 3, what="all replayed messages")
    s = stats_of(platform, QUEUE)
    assert (s.ready, s.dead) == (0, 0)
    assert sorted(a[0] for a in body.done) == [0, 1, 2]

    # Purge.
    body.failing.set()
    actor.send(9, "y")
    wait_for(lambda: stats_of(platform, QUEUE).dead == 1, what="a new dead letter")
    assert inspector.purge(QUEUE) == 1
    assert stats_of(platform, QUEUE).dead == 0
    assert inspector.dead(QUEUE).items == []
    assert inspector.purge(QUEUE) == 0


def test_permanent_failures_are_explained(
    platform: Platform, run_worker: Callable[..., Worker]
) -> None:
    """A ``throws`` failure never reaches the Retries middleware's traceback: the dead letter
    still says why it died."""
    actor = platform.actors["send_welcome_email"]
    actor.send({})  # not an event (no type): a permanent failure
    run_worker()
    wait_for(lambda: stats_of(platform, actor.queue_name).dead == 1, what="a dead letter")
    # The note is written just after the letter lands: wait for it rather than race it.
    wait_for(
        lambda: platform.inspector.dead(actor.queue_name).items[0].error is not None,
        what="the dead letter's error",
    )
    [dead] = platform.inspector.dead(actor.queue_name).items
    assert dead.actor == "send_welcome_email"
    assert dead.error == "UnknownEventType: None is not an event type"
    assert dead.retries == 0


def test_unknown_queue_and_bad_cursor(platform: Platform) -> None:
    from core.errors import Invalid, NotFound

    with pytest.raises(NotFound):
        platform.inspector.dead("nope")
    with pytest.raises(NotFound):
        platform.inspector.purge("nope")
    queue = platform.actors["send_welcome_email"].queue_name
    with pytest.raises(Invalid):
        platform.inspector.dead(queue, cursor="!!not-a-cursor")


def test_sweep_requeues_only_the_messages_of_dead_workers(settings: Settings) -> None:
    crashed = build_broker(Connections(settings))
    alive = build_broker(Connections(settings))
    survivor = build_broker(Connections(settings))
    actor = crashed.actors["send_welcome_email"]
    queue = actor.queue_name
    actor.send({"user_id": "a"})
    actor.send({"user_id": "b"})
    for broker in (crashed, alive):
        consumer = broker.broker.consume(queue, prefetch=1, timeout=100)
        wait_for(lambda c=consumer: next(c), what="a fetch")
    assert (stats_of(survivor, queue).ready, stats_of(survivor, queue).in_progress) == (0, 2)

    # `crashed` stops beating: its heartbeat is older than the timeout; `alive` beats now.
    r = redis.Redis.from_url(settings.redis_url or "")
    beats = f"{settings.redis_prefix}dramatiq:__heartbeats__"
    now = int(time.time() * 1000)
    r.zadd(beats, {crashed.broker.broker_id: now - settings.worker_heartbeat_timeout_ms - 1000})
    r.zadd(beats, {alive.broker.broker_id: now})
    sweep(survivor.broker)
    s = stats_of(survivor, queue)
    assert (s.ready, s.in_progress) == (1, 1)
    # The requeued one is the crashed worker's, and it can be fetched again.
    consumer = survivor.broker.consume(queue, prefetch=1, timeout=100)
    again = wait_for(lambda: next(consumer), what="the requeued message")
    assert again.args[0]["user_id"] in {"a", "b"}
    assert (
        r.scard(f"{settings.redis_prefix}dramatiq:__acks__.{crashed.broker.broker_id}.{queue}") == 0
    )
    for p in (crashed, alive, survivor):
        p.broker.close()


def test_broker_uses_the_configured_heartbeat_timeout(make_settings: Any) -> None:
    platform = build_broker(Connections(make_settings(worker_heartbeat_timeout_ms=7_000)))
    assert platform.broker.heartbeat_timeout == 7_000
    assert any(isinstance(m, WorkerHeartbeat) for m in platform.broker.middleware)


def test_worker_registry_shows_in_flight_and_goes_away(
    settings: Settings, platform: Platform, run_worker: Callable[..., Worker]
) -> None:
    release = threading.Event()
    started = threading.Event()

    def slow() -> None:
        started.set()
        release.wait(10)

    dramatiq.actor(slow, broker=platform.broker, queue_name=QUEUE, actor_name="slow")
    r = redis.Redis.from_url(settings.redis_url or "")
    prefix = settings.redis_prefix
    assert list_workers(r, prefix) == []
    assert not host_has_live_worker(r, prefix)

    worker = run_worker()
    [info] = wait_for(lambda: list_workers(r, prefix), what="a registration")
    assert info.host == socket.gethostname()
    assert info.state == "running"
    assert info.threads == 1
    assert QUEUE in info.queues
    assert info.in_flight == 0
    assert info.heartbeat_age_seconds < 5
    assert host_has_live_worker(r, prefix)
    assert not host_has_live_worker(r, prefix, host="some-other-host")

    platform.broker.get_actor("slow").send()
    assert started.wait(10)
    wait_for(lambda: list_workers(r, prefix)[0].in_flight == 1, what="in_flight == 1")
    release.set()
    wait_for(lambda: list_workers(r, prefix)[0].in_flight == 0, what="in_flight == 0")

    worker.stop(timeout=10_000)
    assert list_workers(r, prefix) == []
    assert not host_has_live_worker(r, prefix)


# -- CLI ------------------------------------------------------------------------------------


def invoke(*args: str, input: str | None = None) -> Any:
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def test_cli_queues_and_dead_letters(
    cli_env: Settings, platform: Platform, run_worker: Callable[..., Worker]
) -> None:
    actor = platform.actors["send_welcome_email"]
    queue = actor.queue_name
    actor.send({})  # dies at once (not an event: UnknownEventType)
    actor.send({})
    worker = run_worker()
    wait_for(lambda: stats_of(platform, queue).dead == 2, what="two dead letters")
    worker.stop(timeout=10_000)
    actor.send_with_options(args=({"user_id": "later"},), delay=60_000)

    out = invoke("queues")
    assert out.exit_code == 0, out.output
    header, *rows = out.output.splitlines()
    assert header.split() == [
        "QUEUE",
        "READY",
        "DELAYED",
        "IN",
        "PROGRESS",
        "DEAD",
        "LATENCY",
        "OBJECTIVE",
    ]
    [row] = [r.split() for r in rows if r.split()[0] == queue]
    assert row[1:5] == ["0", "1", "0", "2"]
    assert rows[-1].startswith("outbox: 0 event(s) pending"), rows[-1]
    as_json = json.loads(invoke("queues", "--json").output)
    assert {"queue": queue, "dead": 2, "delayed": 1}.items() <= next(
        q for q in as_json if q["queue"] == queue
    ).items()

    out = invoke("dead", "list", "--queue", queue)
    assert out.exit_code == 0, out.output
    ids = [line.split()[0] for line in out.output.splitlines()[1:]]
    assert len(ids) == 2
    assert "UnknownEventType" in out.output
    assert "send_welcome_email" in out.output

    out = invoke("dead", "retry", "--queue", queue)
    assert out.exit_code == 2  # neither --ids nor --all
    out = invoke("dead", "retry", "--queue", queue, "--ids", ids[0])
    assert out.exit_code == 0, out.output
    assert "retried 1 message(s)" in out.output
    out = invoke("dead", "retry", "--queue", queue, "--ids", ids[0])
    assert "retried 0 message(s)" in out.output
    assert stats_of(platform, queue).ready == 1
    assert stats_of(platform, queue).dead == 1

    out = invoke("dead", "purge", "--queue", queue, input="n\n")
    assert out.exit_code == 1
    assert stats_of(platform, queue).dead == 1
    out = invoke("dead", "purge", "--queue", queue, input="y\n")
    assert out.exit_code == 0, out.output
    assert "purged 1 dead letter(s)" in out.output
    assert stats_of(platform, queue).dead == 0
    assert "no dead letters" in invoke("dead", "list", "--queue", queue).output
    out = invoke("dead", "purge", "--all", "--yes")
    assert "purged 0 dead letter(s)" in out.output
    out = invoke("dead", "list", "--queue", "nope")
    assert out.exit_code == 1
    assert "No queue named 'nope'" in out.output


def test_cli_healthcheck_worker(
    cli_env: Settings, platform: Platform, run_worker: Callable[..., Worker]
) -> None:
    out = invoke("healthcheck", "worker")
    assert out.exit_code == 1
    worker = run_worker()
    out = invoke("healthcheck", "worker")
    assert out.exit_code == 0, out.output
    assert "healthy" in out.output
    worker.stop(timeout=10_000)
    assert invoke("healthcheck", "worker").exit_code == 1


# -- RabbitMQ --------------------------------------------------------------------------------


def test_rabbitmq_counts_and_dead_letters(make_settings: Any, rabbitmq_url: str) -> None:
    import pika

    from workers.queue_admin_rabbitmq import RabbitmqQueueInspector

    platform = build_broker(Connections(make_settings(broker_url=rabbitmq_url)))
    # RabbitMQ queue names are global: a unique one keeps this test to itself.
    queue = f"ops_test_{time.time_ns()}"
    body = Flaky()

    def flaky_actor(*args: Any) -> None:
        body(*args)

    actor = dramatiq.actor(
        flaky_actor, broker=platform.broker, queue_name=queue, actor_name="flaky", max_retries=0
    )
    inspector = platform.inspector
    assert isinstance(inspector, RabbitmqQueueInspector)
    worker: Worker | None = None
    try:
        for i in range(3):
            actor.send(i)
        actor.send_with_options(args=(9,), delay=60_000)
        s = stats_of(platform, queue)
        assert (s.ready, s.delayed, s.dead, s.in_progress, s.oldest_age_seconds) == (
            3,
            1,
            0,
            None,
            None,
        )
        worker = Worker(platform.broker, queues={queue}, worker_threads=1, worker_timeout=100)
        worker.start()
        wait_for(lambda: stats_of(platform, queue).dead == 3, what="three dead letters")

        page = inspector.dead(queue, limit=2)
        rest = inspector.dead(queue, limit=2, cursor=page.next_cursor)
        assert (len(page.items), len(rest.items), rest.next_cursor) == (2, 1, None)
        items = page.items + rest.items
        assert sorted(m.args[0] for m in items) == [0, 1, 2]
        assert all(m.failed_at is not None and m.actor == "flaky" for m in items)
        assert "RuntimeError: boom" in (items[0].error or "")
        # Listing returned every letter to the queue.
        assert stats_of(platform, queue).dead == 3

        body.failing.clear()
        result = inspector.retry(queue, [items[0].id])
        assert (result.retried, result.not_found) == (1, [])
        wait_for(lambda: body.done, what="the replayed message")
        assert body.done == [(items[0].args[0],)]
        assert inspector.retry(queue, [items[0].id]).not_found == [items[0].id]
        assert stats_of(platform, queue).dead == 2
        assert inspector.purge(queue) == 2
        assert stats_of(platform, queue).dead == 0
    finally:
        if worker is not None:
            worker.stop(timeout=10_000)
        platform.broker.close()
        connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
        channel = connection.channel()
        for name in (queue, f"{queue}.DQ", f"{queue}.XQ"):
            channel.queue_delete(name)
        connection.close()


def test_a_rabbitmq_broker_that_cannot_be_reached_is_a_backend_error(
    make_settings: Any,
) -> None:
    """``backend_errors()`` names pika's errors once a RabbitMQ broker loaded pika, so the
    admin API answers 503 for an unreachable RabbitMQ as for an unreachable Redis."""
    from cli.embedded import free_port
    from workers.queue_inspector import backend_errors

    url = f"amqp://127.0.0.1:{free_port()}"  # a loopback port nobody listens on
    platform = build_broker(Connections(make_settings(broker_url=url)))
    try:
        with pytest.raises(backend_errors()) as caught:
            platform.inspector.stats()
        assert type(caught.value).__module__.startswith("pika"), repr(caught.value)
    finally:
        platform.close()
