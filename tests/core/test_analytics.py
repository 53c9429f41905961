"""Analytics: idempotent folding, rollups and the summary, against the real MongoDB test server."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from bson import ObjectId

from core import analytics, events
from core.context import Context
from core.errors import Invalid
from core.store import Doc, Store

ME = "64b000000000000000000001"
OTHER = "64b000000000000000000002"
DAY = date(2024, 5, 1)
MIDNIGHT = datetime(2024, 5, 1, tzinfo=UTC)


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def event(
    type_: str,
    owner: str = ME,
    *,
    at: datetime = MIDNIGHT,
    created_at: datetime | None = None,
    completed_at: datetime | None = None,
    status: str = "todo",
) -> events.TaskEvent:
    """A task event as the ``fold_analytics`` actor receives it."""
    task = {
        "id": str(ObjectId()),
        "status": status,
        "created_at": iso(created_at or at),
        "completed_at": iso(completed_at) if completed_at else None,
    }
    doc = events.new_event(type_, user_id=owner, subject_id=task["id"], data={"task": task})
    doc["created_at"] = at
    payload = events.payload(doc)
    assert isinstance(payload, events.TaskEvent)
    return payload


async def counters(ctx: Context, owner: str, day: date = DAY) -> Doc:
    """The user's counters of ``day`` once the open folds are added (as the rollup reads them)."""
    await analytics.compact(ctx)
    doc = await ctx.store["analytics_counters"].find_one({"_id": f"{owner}:{day.isoformat()}"})
    return {f: (doc or {}).get(f, 0) for f in analytics.FIGURES}


async def totals(ctx: Context, day: date = DAY) -> Doc:
    """Everyone's counters of ``day`` (summed from the users')."""
    await analytics.compact(ctx)
    found = await analytics.day_totals(ctx, [day.isoformat()])
    return found.get(day.isoformat(), dict.fromkeys(analytics.FIGURES, 0))


async def daily(ctx: Context, owner: str, day: date = DAY) -> Doc | None:
    return await ctx.store["analytics_daily"].find_one({"_id": f"{owner}:{day.isoformat()}"})


async def add_task(
    ctx: Context, owner: str, created: datetime, completed: datetime | None = None
) -> Doc:
    """A task stored directly with known times (status done exactly when completed)."""
    doc: Doc = {
        "_id": ObjectId(),
        "owner": owner,
        "title": "t",
        "status": "done" if completed else "todo",
        "priority": "medium",
        "created_at": created,
        "updated_at": completed or created,
        "completed_at": completed,
        "version": 1,
    }
    await ctx.store["tasks"].insert_one(doc)
    return doc


# -- folding --------------------------------------------------------------------------------


async def test_folding_the_same_event_twice_counts_once(ctx: Context) -> None:
    created = event("task.created")
    assert await analytics.fold_event(ctx, created) is True
    assert await analytics.fold_event(ctx, created) is False
    assert await counters(ctx, ME) == {"created": 1, "completed": 0, "deleted": 0}
    assert await totals(ctx) == {"created": 1, "completed": 0, "deleted": 0}
    # A different event of the same kind does count.
    assert await analytics.fold_event(ctx, event("task.created")) is True
    assert (await counters(ctx, ME))["created"] == 2


async def test_concurrent_redeliveries_count_once(ctx: Context) -> None:
    completed = event("task.completed", completed_at=MIDNIGHT + timedelta(hours=3))
    outcomes = await asyncio.gather(*(analytics.fold_event(ctx, completed) for _ in range(6)))
    assert sorted(outcomes) == [False] * 5 + [True]
    assert await counters(ctx, ME) == {"created": 0, "completed": 1, "deleted": 0}
    assert await totals(ctx) == {"created": 0, "completed": 1, "deleted": 0}


async def test_a_fold_is_one_insert_carrying_its_increments(ctx: Context) -> None:
    created = event("task.created", status="done", completed_at=MIDNIGHT)
    assert await analytics.fold_event(ctx, created) is True
    fold = await ctx.store["analytics_seen"].find_one({"_id": created.id})
    assert fold is not None
    assert (fold["user_id"], fold["day"], fold["inc"]) == (
        ME,
        DAY.isoformat(),
        {"created": 1, "completed": 1},
    )
    # Open: not yet in the counters, and not reaped (the TTL index reads ``at``).
    assert fold[analytics.OPEN] is True and "at" not in fold
    assert await ctx.store["analytics_counters"].count_documents({}) == 0
    assert await analytics.compact(ctx) == 1
    closed = await ctx.store["analytics_seen"].find_one({"_id": created.id})
    assert closed is not None and analytics.OPEN not in closed and "at" in closed
    assert await counters(ctx, ME) == {"created": 1, "completed": 1, "deleted": 0}
    # The guard outlives the compaction: a redelivery now still counts nothing.
    assert await analytics.fold_event(ctx, created) is False
    assert await analytics.compact(ctx) == 0
    assert await counters(ctx, ME) == {"created": 1, "completed": 1, "deleted": 0}


class _FailingCounters:
    """``analytics_counters`` whose increment fails: a crash after the folds were closed
    inside the compaction's transaction."""

    def __init__(self, real: Any):
        self.real = real

    async def bulk_write(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("crash between the writes")


class _CrashingStore(Store):
    def __getitem__(self, name: str) -> Any:
        real = super().__getitem__(name)
        return _FailingCounters(real) if name == "analytics_counters" else real


async def test_a_crash_mid_compaction_leaves_the_folds_open_and_uncounted(ctx: Context) -> None:
    crashing = Context(ctx.settings, _CrashingStore(ctx.store.client, ctx.store.db.name), ctx.redis)
    created = event("task.created")
    assert await analytics.fold_event(ctx, created) is True
    with pytest.raises(RuntimeError):
        await analytics.compact(crashing)
    fold = await ctx.store["analytics_seen"].find_one({"_id": created.id})
    assert fold is not None and fold[analytics.OPEN] is True, "the close was rolled back"
    assert await ctx.store["analytics_counters"].count_documents({}) == 0
    # The next compaction counts it, once.
    assert await counters(ctx, ME) == {"created": 1, "completed": 0, "deleted": 0}
    assert (await totals(ctx))["created"] == 1


async def test_racing_compactions_count_each_fold_once(ctx: Context) -> None:
    folds = [event("task.created", ME if i % 3 else OTHER) for i in range(45)]
    await asyncio.gather(*(analytics.fold_event(ctx, e) for e in folds))
    # Small batches, so the racers meet on the same folds many times.
    closed = await asyncio.gather(*(analytics.compact(ctx, batch=7) for _ in range(4)))
    assert sum(closed) == 45, closed
    assert await counters(ctx, ME) == {"created": 30, "completed": 0, "deleted": 0}
    assert await counters(ctx, OTHER) == {"created": 15, "completed": 0, "deleted": 0}
    assert await ctx.store["analytics_seen"].count_documents({analytics.OPEN: True}) == 0


async def test_folds_made_before_compaction_existed_count_as_closed(ctx: Context) -> None:
    """A fold written by the transaction of earlier versions (guard with ``at``, increments
    already in the counters) is never counted again."""
    await ctx.store["analytics_seen"].insert_one(
        {"_id": "old-event", "type": "task.created", "day": DAY.isoformat(), "at": MIDNIGHT}
    )
    await ctx.store["analytics_counters"].insert_one(
        {"_id": f"{ME}:{DAY.isoformat()}", "user_id": ME, "day": DAY.isoformat(), "created": 1}
    )
    assert await analytics.compact(ctx) == 0
    assert await counters(ctx, ME) == {"created": 1, "completed": 0, "deleted": 0}


async def test_events_count_on_the_task_s_own_day(ctx: Context) -> None:
    late = MIDNIGHT + timedelta(days=1, minutes=1)  # the event itself was stamped next day
    await analytics.fold_event(ctx, event("task.created", at=late, created_at=MIDNIGHT))
    await analytics.fold_event(
        ctx, event("task.completed", at=late, completed_at=MIDNIGHT + timedelta(hours=23))
    )
    await analytics.fold_event(ctx, event("task.deleted", at=late))
    assert await counters(ctx, ME) == {"created": 1, "completed": 1, "deleted": 0}
    assert await counters(ctx, ME, DAY + timedelta(days=1)) == {
        "created": 0,
        "completed": 0,
        "deleted": 1,
    }


async def test_created_done_counts_completed_and_updates_are_not_folded(ctx: Context) -> None:
    assert await analytics.fold_event(
        ctx, event("task.created", status="done", completed_at=MIDNIGHT)
    )
    assert await analytics.fold_event(ctx, event("task.updated")) is False
    assert await counters(ctx, ME) == {"created": 1, "completed": 1, "deleted": 0}
    assert await ctx.store["analytics_seen"].count_documents({}) == 1


async def test_global_counters_sum_the_users(ctx: Context) -> None:
    folds = [
        event("task.created", ME),
        event("task.created", ME),
        event("task.created", OTHER),
        event("task.completed", OTHER, completed_at=MIDNIGHT),
        event("task.deleted", ME),
    ]
    await asyncio.gather(*(analytics.fold_event(ctx, e) for e in folds))
    mine, theirs = await counters(ctx, ME), await counters(ctx, OTHER)
    assert mine == {"created": 2, "completed": 0, "deleted": 1}
    assert theirs == {"created": 1, "completed": 1, "deleted": 0}
    assert await totals(ctx) == {f: mine[f] + theirs[f] for f in mine}


# -- rollups --------------------------------------------------------------------------------


async def seed_day(ctx: Context) -> dict[str, list[Doc]]:
    """Tasks with known durations on DAY, their events folded as the actor would."""
    durations = {ME: [60, 180, 600], OTHER: [30, 90]}  # seconds
    made: dict[str, list[Doc]] = {ME: [], OTHER: []}
    for owner, secs in durations.items():
        for s in secs:
            created = MIDNIGHT + timedelta(hours=1)
            done = created + timedelta(seconds=s)
            made[owner].append(await add_task(ctx, owner, created, done))
            await analytics.fold_event(ctx, event("task.created", owner, at=created))
            await analytics.fold_event(ctx, event("task.completed", owner, completed_at=done))
    # Noise that must not count: an open task, one created on DAY but completed the next day,
    # and one completed the day before.
    await add_task(ctx, ME, MIDNIGHT + timedelta(hours=2))
    await add_task(ctx, ME, MIDNIGHT + timedelta(hours=20), MIDNIGHT + timedelta(days=1, seconds=5))
    await add_task(ctx, ME, MIDNIGHT - timedelta(hours=5), MIDNIGHT - timedelta(seconds=1))
    return made


def figures(doc: Doc | None) -> Doc:
    assert doc is not None
    return {k: v for k, v in doc.items() if k != "rolled_up_at"}


async def test_rollup_of_a_day_gives_counts_and_exact_medians(ctx: Context) -> None:
    await seed_day(ctx)
    assert await analytics.rollup_day(ctx, DAY) == 2
    mine = await daily(ctx, ME)
    assert mine is not None
    assert (mine["created"], mine["completed"], mine["deleted"]) == (3, 3, 0)
    assert mine["median_seconds"] == 180.0
    assert mine["measured"] == 3
    theirs = await daily(ctx, OTHER)
    assert theirs is not None
    assert (theirs["created"], theirs["completed"]) == (2, 2)
    assert theirs["median_seconds"] == 60.0  # the mean of the middle two (30, 90)
    everyone = await daily(ctx, analytics.GLOBAL)
    assert everyone is not None
    assert (everyone["created"], everyone["completed"]) == (5, 5)
    assert everyone["median_seconds"] == 90.0  # of 30, 60, 90, 180, 600
    assert everyone["measured"] == 5


async def test_rolling_up_again_gives_the_same_documents(ctx: Context) -> None:
    await seed_day(ctx)
    await analytics.rollup_day(ctx, DAY)
    first = {d["_id"]: figures(d) async for d in ctx.store["analytics_daily"].find()}
    await analytics.rollup_day(ctx, DAY)
    again = {d["_id"]: figures(d) async for d in ctx.store["analytics_daily"].find()}
    assert again == first
    assert set(first) == {f"{u}:{DAY.isoformat()}" for u in (ME, OTHER, analytics.GLOBAL)}


async def test_rollup_follows_deletions_and_drops_stale_documents(ctx: Context) -> None:
    made = await seed_day(ctx)
    await analytics.rollup_day(ctx, DAY)
    # A stale figure for someone no longer active that day (e.g. written by a past version).
    ghost = "64b0000000000000000000ff"
    await ctx.store["analytics_daily"].insert_one(
        {"_id": f"{ghost}:{DAY.isoformat()}", "user_id": ghost, "day": DAY.isoformat()}
    )
    # The 600 s task is deleted: the median is over the tasks that still exist.
    await ctx.store["tasks"].delete_one({"_id": made[ME][2]["_id"]})
    await analytics.rollup_day(ctx, DAY)
    mine = await daily(ctx, ME)
    assert mine is not None
    assert mine["median_seconds"] == 120.0  # of 60 and 180
    assert mine["completed"] == 3  # the counts are of events: the completion happened
    assert await daily(ctx, ghost) is None


async def test_a_day_without_activity_rolls_up_to_zeros(ctx: Context) -> None:
    assert await analytics.rollup_day(ctx, DAY) == 0
    everyone = await daily(ctx, analytics.GLOBAL)
    assert figures(everyone) | {"_id": None} == {
        "_id": None,
        "user_id": analytics.GLOBAL,
        "day": DAY.isoformat(),
        "created": 0,
        "completed": 0,
        "deleted": 0,
        "median_seconds": None,
        "measured": 0,
    }


async def test_rollup_recent_covers_yesterday_today_and_late_days(ctx: Context) -> None:
    now = MIDNIGHT + timedelta(days=10, hours=3)
    today = now.date()
    three_ago = today - timedelta(days=3)
    expected = [(today - timedelta(days=1)).isoformat(), today.isoformat()]
    assert await analytics.rollup_recent(ctx, now) == expected
    # A late event (delivered after an outage) for a day three days back: rolled up once.
    late_at = analytics.day_start(three_ago) + timedelta(hours=9)
    await analytics.fold_event(ctx, event("task.created", at=late_at))
    assert await analytics.rollup_recent(ctx, now) == [three_ago.isoformat(), *expected]
    assert (await daily(ctx, ME, three_ago) or {}).get("created") == 1
    assert await analytics.rollup_recent(ctx, now) == expected
    # Beyond the window it is counted but not rolled up automatically.
    old = today - timedelta(days=analytics.LATE_DAYS + 1)
    await analytics.fold_event(ctx, event("task.created", at=analytics.day_start(old)))
    assert await analytics.rollup_recent(ctx, now) == expected
    assert (await counters(ctx, ME, old))["created"] == 1


async def test_rollup_reads_completions_through_the_partial_index(ctx: Context) -> None:
    await seed_day(ctx)
    start = analytics.day_start(DAY)
    flt = {"status": "done", "completed_at": {"$gte": start, "$lt": start + timedelta(days=1)}}
    plan = (await ctx.store["tasks"].find(flt).explain())["queryPlanner"]["winningPlan"]
    text = repr(plan)
    assert "COLLSCAN" not in text, plan
    assert "'indexName': 'completed'" in text, plan


# -- the summary ----------------------------------------------------------------------------


async def test_summary_fills_days_and_sums_totals(ctx: Context) -> None:
    await seed_day(ctx)
    await analytics.rollup_day(ctx, DAY)
    result = await analytics.summary(ctx, ME, DAY - timedelta(days=1), DAY + timedelta(days=1))
    assert [d.day for d in result.days] == [DAY - timedelta(days=1), DAY, DAY + timedelta(days=1)]
    before, on, after = result.days
    assert (before.created, before.median_completion_seconds, before.rolled_up_at) == (
        0,
        None,
        None,
    )
    assert (on.created, on.completed, on.median_completion_seconds) == (3, 3, 180.0)
    assert on.rolled_up_at is not None
    assert after.completed == 0
    assert (result.totals.created, result.totals.completed) == (3, 3)
    # Another user's figures never leak in, nor the global ones.
    other = await analytics.summary(ctx, OTHER, DAY, DAY)
    assert other.days[0].median_completion_seconds == 60.0
    assert other.totals.created == 2


async def test_summary_defaults_to_the_last_30_days(ctx: Context) -> None:
    result = await analytics.summary(ctx, ME, None, None, today=DAY)
    assert len(result.days) == analytics.DEFAULT_DAYS
    assert result.days[-1].day == DAY
    assert result.days[0].day == DAY - timedelta(days=29)
    only_to = await analytics.summary(ctx, ME, None, DAY, today=DAY + timedelta(days=90))
    assert only_to.days[-1].day == DAY and len(only_to.days) == 30


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (date(2024, 5, 2), date(2024, 5, 1)),  # from after to
        (date(2024, 1, 1), date(2025, 1, 1)),  # 367 days
        (DAY + timedelta(days=1), None),  # from after the default to (today)
    ],
)
def test_resolve_range_refuses_bad_ranges(start: date, end: date | None) -> None:
    with pytest.raises(Invalid) as info:
        analytics.resolve_range(start, end, DAY)
    assert info.value.errors[0].field == "from"


def test_resolve_range_accepts_edges() -> None:
    assert analytics.resolve_range(date(2024, 1, 1), date(2024, 12, 31), DAY) == (
        date(2024, 1, 1),
        date(2024, 12, 31),
    )  # 366 days (leap year)
    assert analytics.resolve_range(None, date(1, 1, 3), DAY) == (date(1, 1, 1), date(1, 1, 3))
    assert analytics.resolve_range(DAY, DAY, DAY) == (DAY, DAY)


async def test_a_malformed_open_fold_is_closed_uncounted_and_does_not_stop_compaction(
    ctx: Context,
) -> None:
    await ctx.store["analytics_seen"].insert_one(
        {"_id": "bad", "inc": {"created": 1}, "open": True}
    )
    assert await analytics.fold_event(ctx, event("task.created")) is True
    assert await analytics.compact(ctx) == 2
    assert await ctx.store["analytics_seen"].count_documents({analytics.OPEN: True}) == 0
    assert await counters(ctx, ME) == {"created": 1, "completed": 0, "deleted": 0}
