"""Pausing a queue on the real Redis broker with real workers: a paused queue's messages are
not run (nor fetched: they stay ready, in order) and resume runs them; messages a worker
prefetched before the pause went back to the head of the list without counting a failure."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest

from config.connections import Connections
from config.settings import Settings
from core.errors import NotFound
from tests.workers.test_queue_admin import wait_for
from workers.broker import Platform, build_broker
from workers.pause import REFRESH_SECONDS, PausedQueues
from workers.pools import WorkerPools

FIRST = "pause_a"
SECOND = "pause_b"


class Bodies:
    """Calls of the test actors, by queue; ``gate`` holds the ``slow`` calls."""

    def __init__(self) -> None:
        self.calls: dict[str, list[Any]] = {FIRST: [], SECOND: []}
        self.gate = threading.Event()
        self.started = threading.Event()


@pytest.fixture
def setup(settings: Settings) -> Iterator[tuple[Platform, Bodies, dict[str, Any]]]:
    platform = build_broker(Connections(settings))
    bodies = Bodies()
    actors = {}
    for queue in (FIRST, SECOND):

        def run(value: Any, queue: str = queue) -> None:
            if value == "slow":
                bodies.started.set()
                bodies.gate.wait(10)
            bodies.calls[queue].append(value)

        actors[queue] = dramatiq.actor(
            run, broker=platform.broker, queue_name=queue, actor_name=f"run_{queue}"
        )
    yield platform, bodies, actors
    platform.broker.close()


def row(platform: Platform, queue: str) -> Any:
    [s] = [s for s in platform.inspector.stats() if s.queue == queue]
    return s


def test_a_paused_queue_holds_its_messages_and_resume_releases_them(setup: Any) -> None:
    platform, bodies, actors = setup
    inspector = platform.inspector
    # Two pools, as `taskmanager run` has: the second sees the broker through _QuietBroker.
    pools = WorkerPools(platform.broker, [({FIRST}, 1), ({SECOND}, 1)], worker_timeout=100)
    pools.start()
    try:
        assert inspector.set_paused(SECOND, True)
        assert not inspector.set_paused(SECOND, True)  # already paused
        assert row(platform, SECOND).paused
        assert not row(platform, FIRST).paused
        time.sleep(REFRESH_SECONDS + 0.2)  # what a worker may take to see it
        for i in range(5):
            actors[SECOND].send(i)
            actors[FIRST].send(i)
        # The other queue runs; the paused one's messages stay ready, in order.
        wait_for(lambda: bodies.calls[FIRST] == [0, 1, 2, 3, 4], what="the unpaused queue")
        time.sleep(1.5)
        assert bodies.calls[SECOND] == []
        s = row(platform, SECOND)
        assert (s.ready, s.in_progress, s.dead) == (5, 0, 0)
        assert [m.args_summary for m in inspector.messages(SECOND).items] == list("01234")

        resumed = time.monotonic()
        assert inspector.set_paused(SECOND, False)
        wait_for(lambda: len(bodies.calls[SECOND]) == 5, what="the resumed queue")
        took = time.monotonic() - resumed
        print(f"paused queue: 0 of 5 run in 1.5 s; resume to all 5 run: {took:.2f} s")
        assert took < REFRESH_SECONDS + 1.5, took
        assert bodies.calls[SECOND] == [0, 1, 2, 3, 4]
        assert not row(platform, SECOND).paused
    finally:
        pools.stop(timeout=10_000)


def test_messages_prefetched_before_the_pause_go_back_without_running(setup: Any) -> None:
    platform, bodies, actors = setup
    inspector = platform.inspector
    worker = dramatiq.Worker(platform.broker, queues={FIRST}, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        actors[FIRST].send("slow")
        assert bodies.started.wait(10)
        for i in range(3):
            actors[FIRST].send(i)
        # The consumer prefetches beyond the running message (2 per thread): one is taken.
        wait_for(lambda: row(platform, FIRST).in_progress == 2, what="a prefetched message")
        inspector.set_paused(FIRST, True)
        time.sleep(REFRESH_SECONDS + 0.2)
        bodies.gate.set()
        wait_for(lambda: bodies.calls[FIRST] == ["slow"], what="the slow message")
        wait_for(lambda: row(platform, FIRST).in_progress == 0, what="the prefetched put back")
        time.sleep(0.5)
        assert bodies.calls[FIRST] == ["slow"]
        s = row(platform, FIRST)
        assert (s.ready, s.dead, s.delayed) == (3, 0, 0)
        # Back at the head: the order is kept, the retry count untouched.
        items = inspector.messages(FIRST).items
        assert [m.args_summary for m in items] == ["0", "1", "2"]
        assert all(m.retries == 0 for m in items)
        inspector.set_paused(FIRST, False)
        wait_for(lambda: bodies.calls[FIRST] == ["slow", 0, 1, 2], what="the rest, resumed")
    finally:
        bodies.gate.set()
        worker.stop(timeout=10_000)


def test_pausing_an_unknown_queue_is_refused(setup: Any) -> None:
    platform = setup[0]
    with pytest.raises(NotFound):
        platform.inspector.set_paused("nope", True)
    assert platform.inspector.paused() == set()


def test_threads_asking_during_the_first_reading_wait_for_it() -> None:
    """A slow first reading (Redis busy): the threads that ask meanwhile get its answer, not
    the empty set a worker starts with (which let a just-started worker run paused messages)."""
    reading = threading.Event()

    class SlowStore:
        def paused(self) -> set[str]:
            reading.set()
            time.sleep(0.3)
            return {FIRST}

    paused = PausedQueues(SlowStore)
    seen: list[frozenset[str]] = []
    first = threading.Thread(target=lambda: seen.append(paused.names()))
    first.start()
    assert reading.wait(5)
    others = [threading.Thread(target=lambda: seen.append(paused.names())) for _ in range(3)]
    for t in others:
        t.start()
    for t in [first, *others]:
        t.join(5)
    assert seen == [frozenset({FIRST})] * 4
