"""Fair dispatch (core/fairness.py, workers/relay.py): per-user windows of events in flight,
filled round-robin, weights, several relays; the backlog per user (workers/backlog.py).

Over the real Redis broker (and RabbitMQ, with a real worker, for the last test) and
SecantusDB; receipts are written as the workers' middleware
writes them (``events.receipt``), so a window frees exactly when side effects finish."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from bson import ObjectId

from config.settings import parse_share_weights
from core import events, fairness
from core.store import utcnow
from workers.backlog import USER_BACKLOG, user_backlog
from workers.relay import Outcome, Relay


async def _burst(ctx: Any, user: str, n: int) -> list[Any]:
    evs = [
        events.new_event(
            events.EventType.TASK_CREATED, user_id=user, subject_id=f"t{i}", data={"task": {}}
        )
        for i in range(n)
    ]
    await events.record(ctx, evs, None)
    return evs


async def _finish(ctx: Any, user: str | None = None) -> int:
    """Write the receipts of every awaited message (of ``user``'s events): all finished."""
    query: dict[str, Any] = {events.AWAITING: {"$exists": True}}
    if user is not None:
        query["user_id"] = user
    docs = await ctx.store["events"].find(query).to_list()
    for doc in docs:
        await ctx.store["events"].update_one(
            {"_id": doc["_id"]}, events.receipt(list(doc[events.AWAITING]), [])
        )
    return len(docs)


def _queue(ctx: Any, name: str) -> str:
    return f"{ctx.settings.redis_prefix}dramatiq:{name}"


def _recording(relay: Relay) -> Counter[str]:
    """Count the events each relay round sends (instead of the broker)."""
    sent: Counter[str] = Counter()

    def record(claimed: list[Any], outcome: Outcome) -> None:
        for event in claimed:
            sent[str(event["user_id"]) + ":" + str(event["_id"])] += 1
            outcome.sent.append(event["_id"])

    relay._enqueue = record  # type: ignore[method-assign]
    return sent


def _per_user(sent: Counter[str]) -> Counter[str]:
    return Counter(key.split(":")[0] for key in sent)


async def test_a_burst_waits_in_the_outbox_while_a_newcomer_goes_out(
    platform: Any, ctx: Any
) -> None:
    await _burst(ctx, "alice", 50)
    await _burst(ctx, "bob", 1)
    relay = Relay(ctx, platform.broker)
    relay.windows = fairness.Windows(4)
    assert await relay.drain_once() == 5
    # Alice's window (4 events) and Bob's one event are in the broker; 46 wait in the outbox.
    assert await ctx.redis.llen(_queue(ctx, "search")) == 5
    assert await ctx.store["events"].count_documents({"pending": True}) == 46
    assert await relay.drain_once() == 0
    assert relay.held_back
    assert await fairness.in_flight(ctx) == {"alice": 4, "bob": 1}

    top = await user_backlog(ctx, queue="search")
    assert [(r.user_id, r.waiting, r.outbox, r.in_broker) for r in top["search"]] == [
        ("alice", 50, 46, 4),
        ("bob", 1, 0, 1),
    ]
    await _gauges_read_the_view_alike(ctx, relay)
    # A late newcomer overtakes the 46 events waiting: its window is empty.
    await _burst(ctx, "carol", 1)
    assert await relay.drain_once() == 1
    assert await ctx.redis.llen(_queue(ctx, "search")) == 6

    # Alice's side effects finish: her window refills with her next 4, no more.
    await _finish(ctx, "alice")
    assert await relay.drain_once() == 4
    assert await fairness.in_flight(ctx) == {"alice": 4, "bob": 1, "carol": 1}
    await relay.refresh_backlog(force=True)
    assert USER_BACKLOG.labels("search", "alice")._value.get() == 46  # 42 held + 4 sent


async def _gauges_read_the_view_alike(ctx: Any, relay: Relay) -> None:
    """The fair relay's gauges come from its round's view of the pending events, not from a
    reading of the outbox of their own: the same figures."""
    known = relay._known_pending()
    assert known is not None and known[0] == 46
    read, viewed = await events.outbox_lag(ctx), await events.outbox_lag(ctx, known)
    assert (viewed.pending, viewed.set_aside) == (read.pending, read.set_aside)
    assert read.oldest_pending_age_seconds is not None
    assert viewed.oldest_pending_age_seconds == pytest.approx(
        read.oldest_pending_age_seconds, abs=0.5
    )
    assert relay.view.by_type() == {("alice", "task.created"): 46}
    assert await user_backlog(ctx, pending=relay.view.by_type()) == await user_backlog(ctx)


async def test_only_finished_side_effects_free_a_window(platform: Any, ctx: Any) -> None:
    """A follow-up still awaited (a webhook delivery retrying) keeps its event in flight."""
    [first, *_] = await _burst(ctx, "alice", 3)
    relay = Relay(ctx, platform.broker)
    relay.windows = fairness.Windows(1)
    assert await relay.drain_once() == 1
    doc = await ctx.store["events"].find_one({"_id": first["_id"]})
    routed = list(doc[events.AWAITING])
    follow_up = events.Expected(
        events.awaited_key("deliver_webhook", "m1"), "deliver_webhook", utcnow()
    )
    await ctx.store["events"].update_one({"_id": first["_id"]}, events.receipt(routed, [follow_up]))
    assert await relay.drain_once() == 0
    await ctx.store["events"].update_one({"_id": first["_id"]}, events.receipt([follow_up.key], []))
    assert await relay.drain_once() == 1
    # The finished event is no longer marked: only the one just sent is.
    assert (
        await ctx.store["events"].count_documents({fairness.INFLIGHT: True, "user_id": "alice"})
        == 1
    )


async def test_windows_fill_round_robin_within_a_batch(platform: Any, ctx: Any) -> None:
    users = [f"u{i}" for i in range(6)]
    for user in users:
        await _burst(ctx, user, 5)
    relay = Relay(ctx, platform.broker, batch_size=3)
    relay.windows = fairness.Windows(5)
    sent = _recording(relay)
    rounds = []
    for _ in range(4):
        before = Counter(sent)
        await relay.drain_once()
        rounds.append(sorted(_per_user(sent - before)))
    # One event per user per pass, each round starting after the last user served.
    assert rounds == [["u0", "u1", "u2"], ["u3", "u4", "u5"]] * 2


async def test_weights_give_a_user_or_a_role_a_larger_window(platform: Any, ctx: Any) -> None:
    admin = ObjectId()
    await ctx.store["users"].insert_one({"_id": admin, "email": "a@x.test", "role": "admin"})
    for user in ("vip", str(admin), "plain"):
        await _burst(ctx, user, 20)
    relay = Relay(ctx, platform.broker)
    relay.windows = fairness.Windows(2, parse_share_weights("vip=5,role:admin=3"))
    sent = _recording(relay)
    await relay.drain_once()
    assert _per_user(sent) == Counter({"vip": 10, str(admin): 6, "plain": 2})
    assert await fairness.in_flight(ctx) == {"vip": 10, str(admin): 6, "plain": 2}
    # ``default`` raises everyone not named otherwise: only "plain" gets more.
    relay.windows = fairness.Windows(2, parse_share_weights("vip=5,role:admin=3,default=4"))
    await relay.drain_once()
    assert _per_user(sent) == Counter({"vip": 10, str(admin): 6, "plain": 8})


async def test_weights_set_through_the_store_override_the_settings(platform: Any, ctx: Any) -> None:
    """The admin API's weights (``fairness.set_weight``) reach a running relay: over the
    settings' weight for the same key, and dropped again by ``unset_weight``."""
    for user in ("vip", "plain"):
        await _burst(ctx, user, 30)
    relay = Relay(ctx, platform.broker)
    relay.windows = fairness.Windows(2, parse_share_weights("vip=2"))
    relay._stored = fairness.StoredWeights(ttl=0)  # read at every round (5 s when running)
    sent = _recording(relay)
    await fairness.set_weight(ctx, "vip", 5, by="op@x.test")
    await fairness.set_weight(ctx, "default", 3)
    assert await fairness.stored_weights(ctx) == {"vip": 5, "default": 3}
    await relay.drain_once()
    assert _per_user(sent) == Counter({"vip": 10, "plain": 6})
    assert await fairness.unset_weight(ctx, "default") is True
    assert await fairness.unset_weight(ctx, "default") is False
    await _finish(ctx)
    await ctx.store["events"].update_many({}, {"$unset": {fairness.INFLIGHT: ""}})
    before = Counter(sent)
    await relay.drain_once()
    assert _per_user(sent - before) == Counter({"vip": 10, "plain": 2})


@pytest.mark.parametrize(
    ("key", "weight", "error"),
    [
        ("role:Admin", 2, "not a weight key"),
        ("a b", 2, "not a weight key"),
        ("vip", 0, "whole number from 1 to 1000"),
        ("vip", 1001, "whole number from 1 to 1000"),
    ],
)
async def test_a_stored_weight_is_checked(ctx: Any, key: str, weight: int, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        await fairness.set_weight(ctx, key, weight)
    assert await fairness.stored_weights(ctx) == {}


async def test_the_budget_bounds_what_all_users_have_in_flight(platform: Any, ctx: Any) -> None:
    """100 users' windows could hold 1,600 events; the budget keeps the broker's line short
    and the round-robin decides who goes next: one event per user per pass."""
    users = [f"u{i}" for i in range(4)]
    for user in users:
        await _burst(ctx, user, 5)
    relay = Relay(ctx, platform.broker)
    relay.windows = fairness.Windows(5, budget=6)
    assert await relay.drain_once() == 6
    assert await fairness.in_flight(ctx) == {"u0": 2, "u1": 2, "u2": 1, "u3": 1}
    assert await relay.drain_once() == 0
    assert relay.held_back
    # u0's two finish: two places free, for the users whose turn it is (u2, u3).
    await _finish(ctx, "u0")
    assert await relay.drain_once() == 2
    assert await fairness.in_flight(ctx) == {"u1": 2, "u2": 2, "u3": 2}


async def test_several_relays_send_each_event_once_within_the_windows(
    platform: Any, ctx: Any
) -> None:
    await _burst(ctx, "alice", 40)
    await _burst(ctx, "bob", 40)
    relays = [Relay(ctx, platform.broker, batch_size=10) for _ in range(3)]
    counters = []
    for relay in relays:
        relay.windows = fairness.Windows(6)
        counters.append(_recording(relay))
    while await ctx.store["events"].count_documents({"pending": True}):
        await asyncio.gather(*(r.drain_once() for r in relays))
        flying = await fairness.in_flight(ctx)
        # Racing relays may each fill a window once: never more than one window per relay.
        assert all(n <= 6 * len(relays) for n in flying.values()), flying
        # Mark everything in flight finished (``_recording`` sent nothing to the broker).
        await ctx.store["events"].update_many(
            {fairness.INFLIGHT: True}, {"$unset": {fairness.INFLIGHT: ""}}
        )
    sent: Counter[str] = sum(counters, Counter())
    assert len(sent) == 80
    assert set(sent.values()) == {1}


async def test_fairness_off_sends_the_outbox_in_order(platform: Any, ctx: Any) -> None:
    await _burst(ctx, "alice", 30)
    await _burst(ctx, "bob", 1)
    relay = Relay(ctx, platform.broker, fair=False)
    relay.windows = fairness.Windows(4)
    assert await relay.drain_once() == 31
    assert await ctx.redis.llen(_queue(ctx, "search")) == 31
    assert await ctx.store["events"].count_documents({fairness.INFLIGHT: True}) == 0


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("alice", "expected user_id=weight"),
        ("alice=0", "whole number from 1 to 1000"),
        ("alice=2,alice=3", "given twice"),
        ("role:Admin=2", "expected user_id=weight"),
    ],
)
def test_share_weights_are_checked(value: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_share_weights(value)
    assert parse_share_weights(" a=2, role:admin=3 ,default=1") == {
        "a": 2,
        "role:admin": 3,
        "default": 1,
    }


async def test_a_message_parked_for_a_later_retry_frees_the_window(platform: Any, ctx: Any) -> None:
    """A webhook delivery backing off for an hour must not hold back its owner's search."""
    [first, *_] = await _burst(ctx, "alice", 3)
    relay = Relay(ctx, platform.broker)
    relay.windows = fairness.Windows(1)
    assert await relay.drain_once() == 1
    doc = await ctx.store["events"].find_one({"_id": first["_id"]})
    routed = [k for k in doc[events.AWAITING] if k != "fan_out_webhooks"]
    key = events.awaited_key("deliver_webhook", "m1")
    soon = events.Expected(key, "deliver_webhook", utcnow() + timedelta(seconds=61))
    await ctx.store["events"].update_one(
        {"_id": first["_id"]}, events.receipt([*routed, "fan_out_webhooks"], [soon])
    )
    assert await relay.drain_once() == 0  # retried soon: still in flight
    later = events.Expected(key, "deliver_webhook", utcnow() + timedelta(hours=1))
    await ctx.store["events"].update_one({"_id": first["_id"]}, events.receipt([], [later]))
    assert await relay.drain_once() == 1
    assert await fairness.in_flight(ctx, utcnow() + timedelta(seconds=65)) == {"alice": 1}


async def test_over_each_broker_a_newcomer_overtakes_a_burst_and_the_burst_drains(
    broker_settings: Any, aiohttp_client: Any, worker_for: Any
) -> None:
    """A real worker's receipts free the windows: over Redis and RabbitMQ, B's task is found
    while most of A's burst still waits in the outbox, and then all of A's tasks are found."""
    from core import tasks
    from core.task_models import TaskCreate
    from tests.conftest import bearer, eventually, register
    from web.app import create_app
    from web.keys import CONTEXT

    app = create_app(broker_settings(fair_share_window=2))
    client = await aiohttp_client(app)
    worker_for(app)
    ctx = app[CONTEXT]
    a, b = await register(client), await register(client)
    for i in range(60):
        await tasks.create(ctx, a["user"]["id"], TaskCreate(title=f"burst {i}"))
    resp = await client.post(
        "/api/v1/tasks", json={"title": "newcomer"}, headers=bearer(b["access_token"])
    )
    assert resp.status == 201
    task_b = (await resp.json())["id"]

    async def indexed(owner: str) -> int:
        return await ctx.store["search_index"].count_documents({"owner": owner})

    async def b_found() -> bool:
        return await ctx.store["search_index"].find_one({"_id": ObjectId(task_b)}) is not None

    await eventually(b_found, timeout=10, what="B's task indexed")
    held = await ctx.store["events"].count_documents({"pending": True, "user_id": a["user"]["id"]})
    assert held > 30, held  # A's window is 2 events: most of the burst still waits
    await eventually(
        lambda: indexed(a["user"]["id"]), timeout=5, what="A's tasks start being indexed"
    )

    async def all_of_a() -> bool:
        return await indexed(a["user"]["id"]) == 60

    await eventually(all_of_a, timeout=90, what="A's burst drained")
    assert await ctx.store["events"].count_documents({fairness.INFLIGHT: True}) <= 2


async def test_a_reading_of_what_is_in_flight_serves_until_a_window_may_be_full(
    platform: Any, ctx: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between readings the relay counts what it sends; it reads again as soon as a user with
    pending events may have reached their window, so a full window is judged afresh."""
    readings: list[int] = []
    real = fairness.in_flight

    async def counted(*args: Any, **kwargs: Any) -> dict[str, int]:
        readings.append(1)
        return await real(*args, **kwargs)

    monkeypatch.setattr(fairness, "in_flight", counted)
    relay = Relay(ctx, platform.broker)
    relay.windows = fairness.Windows(4)
    relay.flights = fairness.FlightCounts(max_age=3600)  # only a possibly full window reads
    sent = _recording(relay)
    await _burst(ctx, "alice", 2)
    assert await relay.drain_once() == 2 and len(readings) == 1  # the first reading
    await _burst(ctx, "alice", 4)
    assert await relay.drain_once() == 2  # 2 + 2 fill the window of 4, on the counts alone
    assert len(readings) == 1 and relay.flights.counts == {"alice": 4}
    assert await relay.drain_once() == 0 and len(readings) == 2  # full: read again, still full
    await _finish(ctx, "alice")
    assert await relay.drain_once() == 2 and len(readings) == 3  # read again: the window freed
    assert _per_user(sent) == {"alice": 6}
