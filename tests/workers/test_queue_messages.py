"""One message at a time on the real Redis broker: browse ready and delayed messages, find by
id in every state, retry now and delete (ready, delayed held by a running worker, dead),
dead-letter filters and tracebacks with our frames first."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import pytest
from dramatiq import Worker

from config.connections import Connections
from config.settings import Settings
from core.errors import Conflict, Invalid, NotFound
from tests.workers.test_queue_admin import wait_for
from workers.broker import Platform, build_broker
from workers.queue_admin import RedisQueueInspector
from workers.queue_messages import is_ours, ours_first

QUEUE = "msg_test"


class Recorder:
    """A test actor's body: records its calls; fails with ``RuntimeError('boom')`` for
    arguments ``"fail"``."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.lock = threading.Lock()

    def __call__(self, value: Any) -> None:
        with self.lock:
            self.calls.append(value)
        if value == "fail":
            raise RuntimeError("boom")


@pytest.fixture
def setup(settings: Settings) -> Iterator[tuple[Platform, Recorder, Any]]:
    platform = build_broker(Connections(settings))
    body = Recorder()

    def recorded(value: Any) -> None:
        body(value)

    actor = dramatiq.actor(
        recorded, broker=platform.broker, queue_name=QUEUE, actor_name="recorded", max_retries=0
    )
    yield platform, body, actor
    platform.broker.close()


@pytest.fixture
def run_worker(setup: Any) -> Iterator[Callable[[], Worker]]:
    platform = setup[0]
    started: list[Worker] = []

    def start() -> Worker:
        worker = Worker(platform.broker, queues={QUEUE}, worker_threads=1, worker_timeout=100)
        worker.start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop(timeout=10_000)


def inspector_of(platform: Platform) -> RedisQueueInspector:
    inspector = platform.inspector
    assert isinstance(inspector, RedisQueueInspector)
    return inspector


def test_browse_ready_in_the_order_workers_take_them(setup: Any) -> None:
    platform, _, actor = setup
    inspector = inspector_of(platform)
    sent = [actor.send({"user_id": f"u{i}", "n": i}) for i in range(5)]
    page = inspector.messages(QUEUE, "ready", limit=2)
    assert [m.args_summary for m in page.items] == [
        "{'user_id': 'u0', 'n': 0}",
        "{'user_id': 'u1', 'n': 1}",
    ]
    assert [m.user_id for m in page.items] == ["u0", "u1"]
    assert all(m.state == "ready" and m.actor == "recorded" for m in page.items)
    assert page.items[0].message_id == sent[0].message_id
    assert page.next_cursor

    # A worker takes the head meanwhile: the next page still continues after the last shown.
    consumer = platform.broker.consume(QUEUE, prefetch=1, timeout=100)
    taken = wait_for(lambda: next(consumer), what="a fetch")
    assert taken.options["redis_message_id"] == page.items[0].id  # index 0 = next taken
    rest = inspector.messages(QUEUE, "ready", limit=2, cursor=page.next_cursor)
    assert [m.args_summary for m in rest.items] == [
        "{'user_id': 'u2', 'n': 2}",
        "{'user_id': 'u3', 'n': 3}",
    ]
    last = inspector.messages(QUEUE, "ready", limit=2, cursor=rest.next_cursor)
    assert [m.message_id for m in last.items] == [sent[4].message_id]
    assert last.next_cursor is None
    consumer.close()

    with pytest.raises(Invalid):
        inspector.messages(QUEUE, "delayed", cursor=page.next_cursor)  # another list's cursor
    with pytest.raises(NotFound):
        inspector.messages("nope")
    with pytest.raises(NotFound):
        inspector.messages(QUEUE, "dead")


def test_browse_delayed_soonest_first(setup: Any) -> None:
    platform, _, actor = setup
    inspector = inspector_of(platform)
    for delay in (50_000, 10_000, 30_000):
        actor.send_with_options(args=(delay,), delay=delay)
    page = inspector.messages(QUEUE, "delayed", limit=2)
    assert [m.args_summary for m in page.items] == ["10000", "30000"]
    assert all(m.state == "delayed" and m.eta is not None for m in page.items)
    assert page.items[0].eta is not None
    assert page.items[0].eta.timestamp() - time.time() == pytest.approx(10, abs=3)
    rest = inspector.messages(QUEUE, "delayed", limit=2, cursor=page.next_cursor)
    assert [m.args_summary for m in rest.items] == ["50000"]
    assert rest.next_cursor is None


def test_find_by_id_in_every_state(setup: Any, run_worker: Any) -> None:
    platform, _, actor = setup
    inspector = inspector_of(platform)
    ready = actor.send("r")
    delayed = actor.send_with_options(args=("d",), delay=60_000)

    found = inspector.find(ready.options["redis_message_id"])
    assert (found.state, found.args, found.queue) == ("ready", ["r"], QUEUE)
    # Dramatiq's own message id finds it too.
    assert inspector.find(ready.message_id).id == ready.options["redis_message_id"]
    found = inspector.find(delayed.message_id)
    assert (found.state, found.args) == ("delayed", ["d"])
    assert found.eta is not None

    consumer = platform.broker.consume(QUEUE, prefetch=1, timeout=100)
    wait_for(lambda: next(consumer), what="a fetch")
    assert inspector.find(ready.message_id).state == "in_progress"
    consumer.close()

    dying = actor.send("fail")
    run_worker()
    # Dead first, then its note (error, traceback) is written by DeadLetterNotes: wait for both.
    wait_for(
        lambda: (
            (found := inspector.find(dying.message_id)).state == "dead" and found.error is not None
        ),
        what="a dead letter with its error",
    )
    dead = inspector.find(dying.message_id)
    assert dead.error == "RuntimeError: boom"
    assert dead.failed_at is not None
    assert dead.traceback is not None
    assert dead.traceback.startswith("RuntimeError: boom")

    for unknown in ("0" * 36, "no such id", "*"):
        with pytest.raises(NotFound):
            inspector.find(unknown)


def test_retry_now_ready_message_goes_to_the_head(setup: Any) -> None:
    platform, _, actor = setup
    inspector = inspector_of(platform)
    for value in ("a", "b", "c"):
        actor.send(value)
    [_, _, c] = inspector.messages(QUEUE, "ready").items
    assert inspector.retry_message(QUEUE, c.id) == c.id
    assert [m.args_summary for m in inspector.messages(QUEUE, "ready").items] == [
        "'c'",
        "'a'",
        "'b'",
    ]
    consumer = platform.broker.consume(QUEUE, prefetch=1, timeout=100)
    first = wait_for(lambda: next(consumer), what="a fetch")
    assert first.args == ("c",)
    # Taken by a worker: in progress, neither moved nor deleted.
    with pytest.raises(Conflict):
        inspector.retry_message(QUEUE, c.id)
    with pytest.raises(Conflict):
        inspector.delete_message(QUEUE, c.id)
    consumer.close()


def test_retry_now_a_delayed_message_held_by_a_worker_runs_it_once(
    setup: Any, run_worker: Any
) -> None:
    platform, body, actor = setup
    inspector = inspector_of(platform)
    run_worker()
    sent = actor.send_with_options(args=("later",), delay=4_000)
    # The worker fetches it from the delay queue and holds it until its eta.
    wait_for(lambda: _held(inspector), what="the worker holding the delayed message")
    [detail] = inspector.messages(QUEUE, "delayed").items
    assert detail.message_id == sent.message_id
    started = time.monotonic()
    new_id = inspector.retry_message(QUEUE, detail.id)
    assert new_id != detail.id
    wait_for(lambda: body.calls == ["later"], what="the retried message run")
    ran_after = time.monotonic() - started
    assert ran_after < 2.5, ran_after  # now, not at its eta (4 s)
    assert inspector.messages(QUEUE, "delayed").items == []
    with pytest.raises(NotFound):
        inspector.retry_message(QUEUE, detail.id)
    # Past the eta, the copy the worker held was released and skipped: it ran once.
    time.sleep(4.5 - ran_after)
    wait_for(lambda: _idle(inspector), what="the queue idle")
    assert body.calls == ["later"]


def _held(inspector: RedisQueueInspector) -> bool:
    """A delayed message fetched by a worker: in the delay hash, no longer in its list."""
    client = inspector.client
    dq = f"{QUEUE}.DQ"
    return bool(
        client.hlen(inspector.key(f"{dq}.msgs")) == 1 and not client.llen(inspector.key(dq))
    )


def _idle(inspector: RedisQueueInspector) -> bool:
    [s] = [s for s in inspector.stats() if s.queue == QUEUE]
    return (s.ready, s.delayed, s.in_progress) == (0, 0, 0)


def test_delete_ready_delayed_held_and_dead(setup: Any, run_worker: Any) -> None:
    platform, body, actor = setup
    inspector = inspector_of(platform)
    keep = actor.send("keep")
    gone = actor.send("gone")
    inspector.delete_message(QUEUE, gone.message_id)
    with pytest.raises(NotFound):
        inspector.find(gone.message_id)
    with pytest.raises(NotFound):
        inspector.delete_message(QUEUE, gone.message_id)

    run_worker()
    wait_for(lambda: body.calls == ["keep"], what="the kept message")
    held = actor.send_with_options(args=("held",), delay=3_000)
    wait_for(lambda: _held(inspector), what="the worker holding the delayed message")
    inspector.delete_message(QUEUE, held.message_id)
    dying = actor.send("fail")
    # Dead first, then its note (error, traceback) is written by DeadLetterNotes: wait for both.
    wait_for(
        lambda: (
            (found := inspector.find(dying.message_id)).state == "dead" and found.error is not None
        ),
        what="a dead letter with its error",
    )
    dead_id = inspector.find(dying.message_id).id
    inspector.delete_message(QUEUE, dead_id)
    with pytest.raises(NotFound):
        inspector.dead_detail(QUEUE, dead_id)
    with pytest.raises(NotFound):
        inspector.delete_dead(QUEUE, dead_id)
    time.sleep(3.5)  # past the deleted delayed message's eta: its held copy never runs
    wait_for(lambda: _idle(inspector), what="the queue idle")
    assert body.calls == ["keep", "fail"]
    assert keep.message_id not in {m.message_id for m in inspector.dead(QUEUE).items}


def test_dead_filters_detail_and_delete_one(setup: Any) -> None:
    platform, _, actor = setup
    inspector = inspector_of(platform)
    welcome = platform.actors["send_welcome_email"]
    worker = Worker(
        platform.broker,
        queues={QUEUE, welcome.queue_name},
        worker_threads=1,
        worker_timeout=100,
    )
    worker.start()
    try:
        _dead_filters_detail_and_delete_one(inspector, actor, welcome)
    finally:
        worker.stop(timeout=10_000)


def _dead_filters_detail_and_delete_one(
    inspector: RedisQueueInspector, actor: Any, welcome: Any
) -> None:
    for _ in range(3):
        actor.send("fail")
    wait_for(lambda: len(inspector.dead(QUEUE).items) == 3, what="three dead letters")

    assert len(inspector.dead(QUEUE, actor="recorded").items) == 3
    assert inspector.dead(QUEUE, actor="other").items == []
    assert len(inspector.dead(QUEUE, error="BOOM").items) == 3
    assert inspector.dead(QUEUE, error="KeyError").items == []
    page = inspector.dead(QUEUE, actor="recorded", error="boom", limit=2)
    assert len(page.items) == 2
    rest = inspector.dead(QUEUE, actor="recorded", error="boom", limit=2, cursor=page.next_cursor)
    assert len(rest.items) == 1
    assert rest.next_cursor is None
    assert {m.id for m in page.items} & {m.id for m in rest.items} == set()

    detail = inspector.dead_detail(QUEUE, page.items[0].id)
    assert detail.state == "dead"
    assert detail.failed_at is not None
    assert "traceback" not in detail.options
    assert detail.traceback is not None
    inspector.delete_dead(QUEUE, page.items[0].id)
    assert len(inspector.dead(QUEUE).items) == 2
    with pytest.raises(NotFound):
        inspector.dead_detail(QUEUE, page.items[0].id)

    # A real actor of ours failing: our frames (workers/...) come before Dramatiq's.
    welcome.send({})
    queue = welcome.queue_name
    wait_for(lambda: inspector.dead(queue).items, what="the welcome dead letter")
    wait_for(lambda: inspector.dead(queue).items[0].traceback, what="its traceback")
    [item] = inspector.dead(queue).items
    tb = inspector.dead_detail(queue, item.id).traceback
    assert tb is not None
    lines = tb.splitlines()
    assert lines[0].endswith("UnknownEventType: None is not an event type")
    ours = lines.index("Our frames (most recent call last):")
    others = lines.index("Other frames (Dramatiq, libraries):")
    assert ours < others
    our_frames = [ln for ln in lines[ours:others] if ln.startswith("> File")]
    assert our_frames
    assert all("/workers/" in ln or "/core/" in ln for ln in our_frames)
    assert any("dramatiq" in ln for ln in lines[others:])


def test_ours_first_on_a_chained_traceback() -> None:
    tb = (
        "Traceback (most recent call last):\n"
        '  File "/usr/lib/python3/site-packages/dramatiq/worker.py", line 10, in process\n'
        "    res = actor(*args)\n"
        '  File "/app/workers/actors.py", line 20, in handler\n'
        "    do()\n"
        '  File "/app/core/tasks.py", line 30, in do\n'
        "    raise KeyError('x')\n"
        "KeyError: 'x'\n"
        "\n"
        "During handling of the above exception, another exception occurred:\n"
        "\n"
        "Traceback (most recent call last):\n"
        '  File "/usr/lib/python3/site-packages/dramatiq/middleware/retries.py", line 5, in x\n'
        "    raise ValueError('y')\n"
        "ValueError: y\n"
    )
    out = ours_first(tb)
    assert out is not None
    lines = out.splitlines()
    assert lines[0] == "ValueError: y"
    assert lines[2] == "Our frames (most recent call last):"
    assert lines[3].startswith('> File "/app/workers/actors.py", line 20')
    assert lines[4] == "      do()"
    assert lines[5].startswith('> File "/app/core/tasks.py", line 30')
    assert "Chained errors:" in lines
    assert "  KeyError: 'x'" in lines
    assert ours_first(None) is None
    assert ours_first("no frames here") == "no frames here"
    assert is_ours("/srv/app/web/handlers/admin.py")
    assert not is_ours("/venv/lib/site-packages/web/x.py")
    assert not is_ours("/srv/app/tests/workers/test_x.py")


# -- RabbitMQ --------------------------------------------------------------------------------


def test_rabbitmq_dead_letters_one_by_one_pause_and_what_it_cannot_do(
    make_settings: Any, rabbitmq_url: str
) -> None:
    import pika

    from workers.queue_admin import Unsupported
    from workers.queue_admin_rabbitmq import RabbitmqQueueInspector

    platform = build_broker(Connections(make_settings(broker_url=rabbitmq_url)))
    # RabbitMQ queue names are global: a unique one keeps this test to itself.
    queue = f"msg_test_{time.time_ns()}"
    body = Recorder()

    def recorded(value: Any) -> None:
        body(value)

    actor = dramatiq.actor(
        recorded, broker=platform.broker, queue_name=queue, actor_name="recorded", max_retries=0
    )
    inspector = platform.inspector
    assert isinstance(inspector, RabbitmqQueueInspector)
    worker = Worker(platform.broker, queues={queue}, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        for _ in range(2):
            actor.send("fail")
        wait_for(lambda: len(inspector.dead(queue).items) == 2, what="two dead letters")
        [a, b] = inspector.dead(queue, actor="recorded", error="boom").items
        assert inspector.dead(queue, actor="other").items == []
        detail = inspector.dead_detail(queue, a.id)
        assert (detail.state, detail.error) == ("dead", "RuntimeError: boom")
        assert inspector.find(b.id).id == b.id
        inspector.delete_dead(queue, a.id)
        assert [m.id for m in inspector.dead(queue).items] == [b.id]
        with pytest.raises(NotFound):
            inspector.delete_dead(queue, a.id)

        # Ready and delayed messages cannot be read without taking them: 501.
        with pytest.raises(Unsupported):
            inspector.messages(queue)
        with pytest.raises(Unsupported):
            inspector.retry_message(queue, "not-a-dead-letter")
        with pytest.raises(Unsupported):
            inspector.delete_message(queue, "not-a-dead-letter")

        # Pause holds the queue's messages (the consumer fetches nothing); resume runs them.
        assert inspector.set_paused(queue, True)
        time.sleep(1.3)
        for i in range(3):
            actor.send(i)
        time.sleep(1.5)
        assert body.calls == ["fail", "fail"]
        [s] = [s for s in inspector.stats() if s.queue == queue]
        # RabbitMQ pushes up to the prefetch count (2 per thread) to the consumer: delivered,
        # unacked, not counted as ready, and not run either.
        assert s.paused
        assert 1 <= s.ready <= 3
        inspector.set_paused(queue, False)
        wait_for(lambda: body.calls[2:] == [0, 1, 2], what="the resumed queue")
    finally:
        worker.stop(timeout=10_000)
        platform.broker.close()
        connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
        channel = connection.channel()
        for name in (queue, f"{queue}.DQ", f"{queue}.XQ"):
            channel.queue_delete(name)
        connection.close()
