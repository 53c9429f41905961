"""Receipts with a real broker and worker (workers/middleware.py ``OutboxReceipts`` and the
relay's sweep): finished pairs are recorded, a message the broker lost is sent again, a
retrying one is not, follow-ups (messages an actor sends) are awaited and recovered too."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import dramatiq
import pytest
from dramatiq import Worker
from pymongo.asynchronous.collection import AsyncCollection

from config.connections import Connections
from core import events
from core.store import Doc, utcnow
from workers.broker import Platform, build_broker
from workers.middleware import OUTBOX_OPTION, OutboxReceipts, stored_body
from workers.relay import RESENT_TOTAL, Relay

#: The bound the tests run with (seconds).
BOUND = 0.5


def _platform(settings: Any) -> Platform:
    made = build_broker(Connections(settings))
    made.broker.flush_all()  # the RabbitMQ vhost is shared: drop what earlier tests left
    return made


@pytest.fixture
async def platform(make_settings: Any) -> AsyncIterator[Platform]:
    """A platform over Redis whose receipts use :data:`BOUND`."""
    made = _platform(make_settings(outbox_redeliver_after_s=BOUND))
    yield made
    made.close()


@pytest.fixture
async def any_platform(broker_settings: Any) -> AsyncIterator[Platform]:
    """The same over Redis, then over RabbitMQ."""
    made = _platform(broker_settings(outbox_redeliver_after_s=BOUND))
    yield made
    made.close()


@asynccontextmanager
async def working(platform: Platform, queues: set[str] | None = None) -> AsyncIterator[Worker]:
    worker = Worker(platform.broker, worker_threads=2, worker_timeout=100, queues=queues)
    worker.start()
    try:
        yield worker
    finally:
        await asyncio.to_thread(worker.stop, 20_000)


async def eventually(check: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def event_doc(ctx: Any, event_id: Any) -> Doc:
    doc = await ctx.store["events"].find_one({"_id": event_id})
    assert doc is not None
    return doc


def finished(ctx: Any, event_id: Any, key: str) -> Callable[[], Any]:
    async def check() -> bool:
        return key in ((await event_doc(ctx, event_id)).get("finished") or [])

    return check


def resent(actor: str) -> float:
    return RESENT_TOTAL.labels(actor)._value.get()


async def login_event(ctx: Any) -> Doc:
    """An outbox event routed to one real actor (``refresh_user_cache``)."""
    event = events.new_event("user.logged_in", user_id="u-receipts")
    await events.record(ctx, [event], None)
    return event


async def track(ctx: Any, platform: Platform, actor: str, *args: Any) -> tuple[Doc, str]:
    """Send a message of a test actor as an event's follow-up (awaited, due in BOUND)."""
    event = events.new_event("test.receipts", user_id="u-receipts")
    event.pop("pending")
    await events.record(ctx, [event], None)
    message = platform.broker.get_actor(actor).message(*args)
    key = f"{actor}:{message.message_id}"
    message.options[OUTBOX_OPTION] = [str(event["_id"]), key]
    due = utcnow() + timedelta(seconds=BOUND)
    expected = events.Expected(key, actor, due, message=stored_body(message))
    await ctx.store["events"].update_one({"_id": event["_id"]}, events.receipt((), [expected]))
    platform.broker.enqueue(message)
    return event, key


async def test_a_finished_pair_is_recorded_and_swept_clean(ctx: Any, platform: Platform) -> None:
    event = await login_event(ctx)
    relay = Relay(ctx, platform.broker, redeliver_after=BOUND)
    assert relay.redeliver_after == timedelta(seconds=BOUND)
    assert await relay.drain_once() == 1
    doc = await event_doc(ctx, event["_id"])
    assert set(doc["awaiting"]) == {"refresh_user_cache"}
    assert doc["recheck_at"] == doc["awaiting"]["refresh_user_cache"]["due"]
    before = resent("refresh_user_cache")
    async with working(platform):
        await eventually(finished(ctx, event["_id"], "refresh_user_cache"), "the receipt")
    await asyncio.sleep(BOUND)
    await relay.sweep_once()
    doc = await event_doc(ctx, event["_id"])
    assert "awaiting" not in doc and "recheck_at" not in doc
    assert doc["finished"] == ["refresh_user_cache"]
    assert resent("refresh_user_cache") == before


async def test_a_message_the_broker_lost_is_sent_again(ctx: Any, any_platform: Platform) -> None:
    platform = any_platform
    event = await login_event(ctx)
    relay = Relay(ctx, platform.broker, redeliver_after=BOUND)
    await relay.drain_once()
    platform.broker.flush_all()  # the broker loses its memory before a worker took it
    before = resent("refresh_user_cache")
    await relay.sweep_once()
    assert resent("refresh_user_cache") == before, "not before the bound"
    await asyncio.sleep(BOUND)
    await relay.sweep_once()
    assert resent("refresh_user_cache") == before + 1
    await relay.sweep_once()
    assert resent("refresh_user_cache") == before + 1, "claimed once"
    async with working(platform):
        await eventually(finished(ctx, event["_id"], "refresh_user_cache"), "the resent one")
    await asyncio.sleep(2 * BOUND)
    await relay.sweep_once()
    doc = await event_doc(ctx, event["_id"])
    assert "recheck_at" not in doc
    assert resent("refresh_user_cache") == before + 1


async def test_a_retrying_message_is_not_resent_before_its_eta(
    ctx: Any, platform: Platform
) -> None:
    runs: list[int] = []

    def t_later(n: int) -> None:
        runs.append(n)
        raise dramatiq.Retry("not now", delay=60_000)

    dramatiq.actor(t_later, broker=platform.broker, queue_name="t_receipts", max_retries=5)
    event, key = await track(ctx, platform, "t_later", 1)
    relay = Relay(ctx, platform.broker, redeliver_after=BOUND)
    async with working(platform):

        async def retried() -> bool:
            entry = (await event_doc(ctx, event["_id"]))["awaiting"][key]
            return bool(entry.get("retries") == 1)

        await eventually(retried, "the retry's receipt")
        await asyncio.sleep(BOUND * 2)
        await relay.sweep_once()
    doc = await event_doc(ctx, event["_id"])
    due = doc["awaiting"][key]["due"]
    assert due >= utcnow() + timedelta(seconds=55)
    assert doc["recheck_at"] == due
    assert resent("t_later") == 0
    assert runs == [1]


async def test_quick_retries_cost_one_receipt_and_success_finishes(
    ctx: Any, platform: Platform
) -> None:
    """A message deferred again and again (like a webhook waiting for a slot) writes its due
    once per half bound, not once per retry; its success then finishes it."""
    runs: list[int] = []

    def t_deferred(n: int) -> None:
        runs.append(n)
        if len(runs) < 5:
            raise dramatiq.Retry("slot taken", delay=10)

    dramatiq.actor(t_deferred, broker=platform.broker, queue_name="t_receipts", max_retries=10)
    [receipts] = [m for m in platform.broker.middleware if isinstance(m, OutboxReceipts)]
    receipts.bound = timedelta(seconds=60)  # so that all 4 retries fall in one half bound
    event, key = await track(ctx, platform, "t_deferred", 1)
    async with working(platform):
        await eventually(finished(ctx, event["_id"], key), "the receipt")
    doc = await event_doc(ctx, event["_id"])
    assert len(runs) == 5
    # The test's own receipt, one for the first retry, one for the success.
    assert doc["receipts_rev"] == 3
    assert doc["awaiting"][key]["retries"] == 1


async def test_a_dead_letter_counts_as_finished(ctx: Any, platform: Platform) -> None:
    def t_doomed(n: int) -> None:
        raise ValueError("permanent")

    dramatiq.actor(t_doomed, broker=platform.broker, queue_name="t_receipts", throws=(ValueError,))
    event, key = await track(ctx, platform, "t_doomed", 1)
    async with working(platform):
        await eventually(finished(ctx, event["_id"], key), "the dead letter's receipt")


async def test_follow_ups_are_awaited_and_sent_again_when_lost(
    ctx: Any, any_platform: Platform
) -> None:
    """An async actor sends a follow-up from a thread (as the webhook fan-out does): the
    follow-up is recorded with its body, and when the broker loses it, sent again."""
    platform = any_platform
    children: list[str] = []

    def t_child(word: str) -> None:
        children.append(word)

    async def t_parent(word: str) -> None:
        await asyncio.to_thread(child.send, word)

    child = dramatiq.actor(t_child, broker=platform.broker, queue_name="t_children")
    dramatiq.actor(t_parent, broker=platform.broker, queue_name="t_receipts")
    event, key = await track(ctx, platform, "t_parent", "hello")
    async with working(platform, queues={"t_receipts"}):
        await eventually(finished(ctx, event["_id"], key), "the parent's receipt")
    doc = await event_doc(ctx, event["_id"])
    [child_key] = [k for k in doc["awaiting"] if k.startswith("t_child:")]
    assert child_key not in doc["finished"]
    assert doc["awaiting"][child_key]["actor"] == "t_child"
    platform.broker.flush_all()  # the child is lost
    relay = Relay(ctx, platform.broker, redeliver_after=BOUND)
    await asyncio.sleep(BOUND)
    await relay.sweep_once()
    assert resent("t_child") >= 1
    async with working(platform, queues={"t_children"}):
        await eventually(finished(ctx, event["_id"], child_key), "the child's receipt")
    assert children == ["hello"]


async def test_a_flush_writes_each_event_once(
    ctx: Any, platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The receipts of one event's actors that wait for the same flush become one update of
    the event (SecantusDB rewrites every index entry of a document it updates)."""
    [receipts] = [m for m in platform.broker.middleware if isinstance(m, OutboxReceipts)]
    sent: list[int] = []
    real = AsyncCollection.bulk_write

    async def counted(self: AsyncCollection[Doc], requests: Any, **kwargs: Any) -> Any:
        sent.append(len(requests))
        return await real(self, requests, **kwargs)

    monkeypatch.setattr(AsyncCollection, "bulk_write", counted)
    first, second = await login_event(ctx), await login_event(ctx)
    due = utcnow() + timedelta(seconds=60)
    awaited = events.receipt((), [events.Expected("fan_out_webhooks", "fan_out_webhooks", due)])
    receipts._pending = [
        (first["_id"], events.receipt(["refresh_user_cache"], ())),
        (second["_id"], events.receipt(["refresh_user_cache"], ())),
        (first["_id"], awaited),
        (first["_id"], events.receipt(["index_task"], ())),
    ]
    await receipts.flush()
    assert sent == [2]
    doc = await event_doc(ctx, first["_id"])
    assert doc["finished"] == ["refresh_user_cache", "index_task"]
    assert list(events.unfinished(doc)) == ["fan_out_webhooks"]
    assert doc["receipts_rev"] == 3
    assert (await event_doc(ctx, second["_id"]))["finished"] == ["refresh_user_cache"]
