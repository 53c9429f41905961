"""The outbox relay: claims, enqueues, marks; gives a batch back when the broker fails.

Per-event failures, set-aside events and the outbox lag: test_relay_poison.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from core import events
from workers.relay import Outcome, Relay


async def _pending(ctx: Any, n: int) -> list[Any]:
    evs = [
        events.new_event(
            events.EventType.TASK_CREATED, user_id=f"u{i}", subject_id=f"t{i}", data={"task": {}}
        )
        for i in range(n)
    ]
    await events.record(ctx, evs, None)
    return evs


async def test_drain_enqueues_one_message_per_actor_and_marks_dispatched(
    platform: Any, ctx: Any
) -> None:
    await _pending(ctx, 3)
    relay = Relay(ctx, platform.broker)
    assert await relay.drain_once() == 3
    assert await ctx.store["events"].count_documents({"pending": True}) == 0
    assert await ctx.store["events"].count_documents({"dispatched_at": {"$exists": True}}) == 3
    assert await relay.drain_once() == 0
    # task.created feeds the cache, search, webhooks and analytics queues: one message each.
    for queue in ("cache", "search", "webhooks", "analytics"):
        assert await ctx.redis.llen(f"{ctx.settings.redis_prefix}dramatiq:{queue}") == 3, queue


async def test_a_failed_send_gives_the_batch_back_at_once(platform: Any, ctx: Any) -> None:
    await _pending(ctx, 2)
    relay = Relay(ctx, platform.broker, lease_seconds=300)

    def broken(message: Any, **options: Any) -> None:
        raise ConnectionError("broker down")

    platform.broker.enqueue = broken  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        await relay.drain_once()
    left = await ctx.store["events"].find({"pending": True}).to_list()
    assert len(left) == 2
    assert all("lease_owner" not in e and "lease_until" not in e for e in left)
    # An outage charges no event.
    assert all("attempts" not in e and "next_attempt_at" not in e for e in left)
    # Without the release, the 300 s lease would hide them from the next round.
    del platform.broker.enqueue
    assert await relay.drain_once() == 2


async def test_concurrent_relays_claim_each_event_once(platform: Any, ctx: Any) -> None:
    await _pending(ctx, 40)
    sent: list[str] = []
    relays = [Relay(ctx, platform.broker, batch_size=10) for _ in range(3)]

    def record(claimed: list[Any], outcome: Outcome) -> None:
        sent.extend(str(e["_id"]) for e in claimed)
        outcome.sent.extend(e["_id"] for e in claimed)

    for relay in relays:
        relay._enqueue = record  # type: ignore[method-assign]
    while await ctx.store["events"].count_documents({"pending": True}):
        await asyncio.gather(*(r.drain_once() for r in relays))
    assert len(sent) == 40
    assert len(set(sent)) == 40


async def test_a_stop_mid_batch_settles_the_batch_before_the_relay_ends(
    platform: Any, ctx: Any
) -> None:
    """Found by `make chaos` (rolling restart): the web's SIGTERM cancels the relay; a cancel
    landing while a batch was being sent used to skip its settling, leaving the events pending
    under the stopping relay's lease (their side effects 30 s late)."""
    await _pending(ctx, 3)
    relay = Relay(ctx, platform.broker, lease_seconds=300)
    sending, release = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow(claimed: list[Any], outcome: Outcome) -> None:
        loop.call_soon_threadsafe(sending.set)
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(10)
        outcome.sent.extend(e["_id"] for e in claimed)

    relay._enqueue = slow  # type: ignore[method-assign]
    task = asyncio.create_task(relay.run())
    await asyncio.wait_for(sending.wait(), 10)
    task.cancel()
    await asyncio.sleep(0.2)
    assert not task.done()  # still finishing the batch it had out
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    assert await ctx.store["events"].count_documents({"pending": True}) == 0
    assert await ctx.store["events"].count_documents({"dispatched_at": {"$exists": True}}) == 3
