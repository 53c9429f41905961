"""Analytics: task events folded into per-day counters, rolled up into per-day figures.

Three collections, all keyed by ``"<user id>:<YYYY-MM-DD>"`` (UTC days), with ``"*"`` in place
of the user id for everyone together:

- ``analytics_seen``: one document per folded event id (a *fold*, written by
  :func:`fold_event` in one insert), with the increments it stands for. Keyed by the event id,
  it is the guard that makes folding idempotent under at-least-once delivery. A fold is
  *open* until :func:`compact` adds it to the counters; it is reaped :data:`SEEN_TTL_DAYS`
  after that.
- ``analytics_counters``: ``created`` / ``completed`` / ``deleted`` counts per user and day,
  incremented by :func:`compact` in the same transaction that closes the folds it adds, so a
  crash between the two can neither lose an event nor count it twice. The rollup compacts
  first, so what it reads counts every event folded before it began.
- ``analytics_daily``: what the API reads (:func:`summary`): the counters plus the median time
  to complete, written by :func:`rollup_day`, which the ``analytics-rollup`` scheduled job runs
  hourly for yesterday, today and any recent day that a late event changed.

The counts are of events: a task completed, reopened and completed again counts twice, and a
deleted task still counts as created. The median is over tasks as they are stored when the day
is rolled up: tasks completed that day (``completed_at`` within it) that still exist and are
still done. A task deleted later stops counting at the next rollup of its completion day; days
older than yesterday are rolled up again only when a late event changes their counters.
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pymongo import ReplaceOne, UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from config.logging import get_logger
from core.context import Context
from core.errors import FieldError, Invalid
from core.events import EventType, TaskEvent
from core.store import Doc, utcnow

#: Which counter each event type increments (other events are not folded).
COUNTED: dict[EventType, str] = {
    EventType.TASK_CREATED: "created",
    EventType.TASK_COMPLETED: "completed",
    EventType.TASK_DELETED: "deleted",
}
FIGURES = ("created", "completed", "deleted")
#: The user id of the figures of everyone together.
GLOBAL = "*"
#: How long an event id is remembered as folded once its fold was added to the counters;
#: redeliveries come within minutes (retries back off to 5 min), so a week is a wide margin.
SEEN_TTL_DAYS = 7
#: Days before yesterday that :func:`rollup_recent` re-rolls when late events changed them
#: (after a long broker outage); older events are still counted but need a manual rollup.
LATE_DAYS = SEEN_TTL_DAYS
DEFAULT_DAYS = 30
MAX_DAYS = 366
_WRITE_BATCH = 1000
#: The field of a fold not yet added to the counters (sparse index ``open``).
OPEN = "open"
_ONE_DAY = timedelta(days=1)
log = get_logger(__name__)
_ISO_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _utc(value: str | datetime) -> datetime:
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _event_day(event: TaskEvent, counter: str) -> date:
    """The UTC day an event counts on: a task's own ``created_at`` / ``completed_at`` for those
    counters (the same instants the rollup's median reads), else when the event happened."""
    own = {"created": "created_at", "completed": "completed_at"}.get(counter)
    moment = event.data.task.get(own) if own else None
    return _utc(moment or event.created_at).date()


def day_start(day: date) -> datetime:
    """Midnight UTC at the start of ``day``."""
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


async def fold_event(ctx: Context, event: TaskEvent) -> bool:
    """Fold one task event into its user's counts of its day; returns False when it is not
    counted or was already folded.

    One insert, keyed by the event id: the fold (``analytics_seen``) carries the increments it
    stands for, so a redelivered event meets its own fold and changes nothing, and a crash
    leaves either the whole fold or none of it. :func:`compact` adds open folds to the
    counters later, many at a time. (Until 2026-12 a fold was a transaction of the guard and
    the counter's ``$inc``: concurrent folds of one user's day collided on that counter and
    were aborted and retried, 11 of the pipeline's 26 MongoDB operations per task write.)
    A task created already done counts as created and completed (no ``task.completed`` event
    is emitted for it).
    """
    counter = COUNTED.get(event.type)
    if counter is None:
        return False
    inc = {counter: 1}
    if event.type == EventType.TASK_CREATED and event.data.task.get("status") == "done":
        inc["completed"] = 1
    fold = {
        "_id": event.id,
        "type": str(event.type),
        "user_id": event.user_id,
        "day": _event_day(event, counter).isoformat(),
        "inc": inc,
        "folded_at": utcnow(),
        OPEN: True,
    }
    try:
        await ctx.store["analytics_seen"].insert_one(fold)
    except DuplicateKeyError:
        return False
    return True


async def compact(ctx: Context, *, batch: int = _WRITE_BATCH) -> int:
    """Add the open folds to the counters; returns how many folds were closed.

    Batch by batch, each in one transaction (:func:`_close`): the folds are closed (``open``
    removed, ``at`` set: the guard's week runs from then) and their increments, summed per
    user and day, are added to the counters. A crash leaves a batch wholly open or wholly
    counted, and of two compactions racing for the same folds one counts them (the other
    abandons its batch and reads again). The rollup compacts before it reads the counters.
    """
    seen = ctx.store["analytics_seen"]
    closed = 0
    while True:
        folds = (
            await seen.find({OPEN: True}, {"user_id": 1, "day": 1, "inc": 1}).limit(batch).to_list()
        )
        if not folds:
            return closed
        if await _close(ctx, folds):
            closed += len(folds)
            if len(folds) < batch:
                return closed


async def counted_now(db: AsyncDatabase[Doc], user_ids: list[str]) -> dict[str, int]:
    """Everything counted for ``user_ids`` as of now, all days together: their counters plus
    their open folds (what the next compaction adds). For ledgers that check the counts
    against the events without compacting (benchmarks, end-to-end tests)."""
    total = dict.fromkeys(FIGURES, 0)
    async for doc in db["analytics_counters"].find({"user_id": {"$in": user_ids}}):
        for name in FIGURES:
            total[name] += int(doc.get(name, 0))
    async for fold in db["analytics_seen"].find(
        {OPEN: True, "user_id": {"$in": user_ids}}, {"inc": 1}
    ):
        for name, n in (fold.get("inc") or {}).items():
            if name in total:
                total[name] += int(n)
    return total


class _Raced(Exception):
    """Raised inside a compaction when another compaction closed some of its folds first."""


async def _close(ctx: Context, folds: list[Doc]) -> bool:
    """Close ``folds`` and add their increments to the counters, in one transaction; False
    when another compaction closed some of them first (nothing written). A fold without a
    user or a day (not one :func:`fold_event` writes) is closed uncounted, so it cannot stop
    every later rollup."""
    sums: dict[str, Doc] = {}
    for fold in folds:
        if not isinstance(fold.get("user_id"), str) or not isinstance(fold.get("day"), str):
            log.warning("analytics.fold_malformed", fold_id=str(fold.get("_id")))
            continue
        key = f"{fold['user_id']}:{fold['day']}"
        entry = sums.setdefault(key, {"user_id": fold["user_id"], "day": fold["day"], "inc": {}})
        for name, n in (fold.get("inc") or {}).items():
            if name in FIGURES:
                entry["inc"][name] = entry["inc"].get(name, 0) + int(n)
    ids = [f["_id"] for f in folds]
    adds = [
        UpdateOne(
            {"_id": key},
            {"$inc": v["inc"], "$setOnInsert": {"user_id": v["user_id"], "day": v["day"]}},
            upsert=True,
        )
        for key, v in sums.items()
        if v["inc"]
    ]

    async def work(session: AsyncClientSession) -> None:
        result = await ctx.store["analytics_seen"].update_many(
            {"_id": {"$in": ids}, OPEN: True},
            {"$unset": {OPEN: ""}, "$set": {"at": utcnow()}},
            session=session,
        )
        if result.modified_count != len(ids):
            raise _Raced
        if adds:
            await ctx.store["analytics_counters"].bulk_write(adds, ordered=False, session=session)

    try:
        await ctx.store.transaction(work)
    except _Raced:
        return False
    return True


def _median_seconds(durations_ms: list[int]) -> float | None:
    if not durations_ms:
        return None
    return round(statistics.median(durations_ms) / 1000, 3)


def _daily_doc(
    user_id: str, day: str, counters: Doc | None, durations_ms: list[int], at: datetime
) -> Doc:
    counters = counters or {}
    return {
        "_id": f"{user_id}:{day}",
        "user_id": user_id,
        "day": day,
        **{name: int(counters.get(name, 0)) for name in FIGURES},
        "median_seconds": _median_seconds(durations_ms),
        "measured": len(durations_ms),
        "rolled_up_at": at,
    }


async def _durations(ctx: Context, day: date) -> dict[str, list[int]]:
    """Milliseconds from creation to completion of the tasks completed on ``day``, by owner.

    Streamed and measured here rather than with ``$median``: per user the counts are small and
    an exact median (the mean of the middle two for an even count) is what a user expects,
    where MongoDB's ``$median`` is approximate and picks one of the two.
    """
    start = day_start(day)
    pipeline: list[Doc] = [
        # status "done" matches the partial index tasks.completed (completed_at is set exactly
        # while a task is done).
        {"$match": {"status": "done", "completed_at": {"$gte": start, "$lt": start + _ONE_DAY}}},
        {"$project": {"_id": 0, "owner": 1, "ms": {"$subtract": ["$completed_at", "$created_at"]}}},
    ]
    out: dict[str, list[int]] = defaultdict(list)
    async for row in await ctx.store["tasks"].aggregate(pipeline):
        # Creation and completion can be stamped by different web hosts: never below zero.
        out[str(row["owner"])].append(max(0, int(row["ms"])))
    return out


async def day_totals(ctx: Context, days: list[str]) -> dict[str, Doc]:
    """Everyone's counters of each day (``YYYY-MM-DD``), summed from the users' counters."""
    cursor = await ctx.store["analytics_counters"].aggregate(
        [
            {"$match": {"day": {"$in": days}, "user_id": {"$ne": GLOBAL}}},
            {"$group": {"_id": "$day", **{f: {"$sum": f"${f}"} for f in FIGURES}}},
        ]
    )
    return {row["_id"]: {f: int(row[f]) for f in FIGURES} async for row in cursor}


async def rollup_day(ctx: Context, day: date) -> int:
    """Recompute ``analytics_daily`` for ``day``: every user with counters or completed tasks
    that day, and everyone together (``"*"``). Idempotent: documents are replaced whole, and
    documents of users no longer active that day are removed. Returns the users rolled up."""
    key = day.isoformat()
    await compact(ctx)
    at = utcnow()
    counters = {
        doc["user_id"]: doc async for doc in ctx.store["analytics_counters"].find({"day": key})
    }
    durations = await _durations(ctx, day)
    users = (set(counters) | set(durations)) - {GLOBAL}
    everyone = [ms for per_user in durations.values() for ms in per_user]
    totals = {f: sum(int(counters[u].get(f, 0)) for u in users if u in counters) for f in FIGURES}
    docs = [_daily_doc(u, key, counters.get(u), durations.get(u, []), at) for u in sorted(users)]
    docs.append(_daily_doc(GLOBAL, key, totals, everyone, at))
    daily = ctx.store["analytics_daily"]
    for i in range(0, len(docs), _WRITE_BATCH):
        batch = docs[i : i + _WRITE_BATCH]
        await daily.bulk_write(
            [ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in batch], ordered=False
        )
    written = {d["_id"] for d in docs}
    stale = [
        d["_id"] async for d in daily.find({"day": key}, {"_id": 1}) if d["_id"] not in written
    ]
    for i in range(0, len(stale), _WRITE_BATCH):
        await daily.delete_many({"_id": {"$in": stale[i : i + _WRITE_BATCH]}})
    return len(users)


async def _late_days(ctx: Context, today: date) -> list[date]:
    """Days before yesterday (within :data:`LATE_DAYS`) whose global counters differ from what
    their last rollup saw: late events arrived. Counters only grow, so equal figures mean
    nothing was folded since."""
    window = [(today - timedelta(days=n)).isoformat() for n in range(2, LATE_DAYS + 1)]
    counted = await day_totals(ctx, window)
    ids = [f"{GLOBAL}:{day}" for day in counted]
    projection = dict.fromkeys(("day", *FIGURES), 1)
    rolled = {
        d["day"]: d
        async for d in ctx.store["analytics_daily"].find({"_id": {"$in": ids}}, projection)
    }
    late: list[date] = []
    for day, figures in counted.items():
        seen = rolled.get(day, {})
        if not seen or any(figures[f] != int(seen.get(f, 0)) for f in FIGURES):
            late.append(date.fromisoformat(day))
    return late


async def rollup_recent(ctx: Context, now: datetime | None = None) -> list[str]:
    """Roll up yesterday and today (UTC), plus recent days changed by late events; returns the
    days rolled up (``YYYY-MM-DD``, oldest first)."""
    today = _utc(now or utcnow()).date()
    await compact(ctx)
    days = sorted({today - _ONE_DAY, today, *await _late_days(ctx, today)})
    for day in days:
        await rollup_day(ctx, day)
    return [d.isoformat() for d in days]


# -- the API's view ------------------------------------------------------------------------


def _iso_day(value: object) -> object:
    if isinstance(value, str) and not _ISO_DAY.fullmatch(value):
        raise ValueError("Use a date as YYYY-MM-DD")
    return value


#: A date written exactly ``YYYY-MM-DD`` (pydantic alone would also take timestamps).
Day = Annotated[date, BeforeValidator(_iso_day)]


class SummaryQuery(BaseModel):
    """``GET /analytics/summary`` query."""

    model_config = ConfigDict(extra="forbid")

    from_: Day | None = Field(
        None,
        alias="from",
        description="First day (YYYY-MM-DD, UTC), inclusive; default 'to' minus 29 days. "
        f"Not after 'to', and at most {MAX_DAYS - 1} days before it (a range of at most "
        f"{MAX_DAYS} days): else 422",
    )
    to: Day | None = Field(
        None,
        description="Last day (YYYY-MM-DD, UTC), inclusive; default today (so 'from' alone "
        f"must be at most {MAX_DAYS - 1} days ago)",
    )


class DayFigures(BaseModel):
    """One UTC day of a user's analytics."""

    day: date
    created: int = Field(description="Tasks created")
    completed: int = Field(description="Tasks completed (a task completed twice counts twice)")
    deleted: int = Field(description="Tasks deleted")
    median_completion_seconds: float | None = Field(
        description="Median time from creation to completion of the tasks completed that day "
        "(those that still exist); null when none"
    )
    rolled_up_at: datetime | None = Field(
        description="When these figures were computed (hourly); null if never"
    )


class Totals(BaseModel):
    """Sums over the range."""

    created: int
    completed: int
    deleted: int


class AnalyticsSummary(BaseModel):
    """Per-day figures of the caller's tasks, oldest day first, and their totals."""

    days: list[DayFigures]
    totals: Totals


def resolve_range(from_day: date | None, to_day: date | None, today: date) -> tuple[date, date]:
    """The inclusive range asked for: ``to`` defaults to today and ``from`` to ``to`` minus
    29 days; ``from`` after ``to``, or more than :data:`MAX_DAYS` days, is :class:`Invalid`."""
    end = to_day or today
    if from_day is not None:
        start = from_day
    elif end - date.min >= timedelta(days=DEFAULT_DAYS - 1):
        start = end - timedelta(days=DEFAULT_DAYS - 1)
    else:
        start = date.min
    if start > end:
        raise Invalid(
            "'from' is after 'to'",
            [FieldError(field="from", message=f"Must not be after 'to' ({end.isoformat()})")],
        )
    if (end - start).days + 1 > MAX_DAYS:
        raise Invalid(
            f"The range is longer than {MAX_DAYS} days",
            [FieldError(field="from", message=f"At most {MAX_DAYS} days before 'to', inclusive")],
        )
    return start, end


async def summary(
    ctx: Context,
    user_id: str,
    from_day: date | None,
    to_day: date | None,
    *,
    today: date | None = None,
) -> AnalyticsSummary:
    """The user's rolled-up figures for each day of the range (days never rolled up or without
    activity read as zeros with a null median), plus totals."""
    start, end = resolve_range(from_day, to_day, today or utcnow().date())
    found = {
        doc["day"]: doc
        async for doc in ctx.store["analytics_daily"].find(
            {
                "_id": {"$gte": f"{user_id}:{start.isoformat()}", "$lte": f"{user_id}:{end}"},
                "user_id": user_id,
            }
        )
    }
    days: list[DayFigures] = []
    for n in range((end - start).days + 1):
        day = start + timedelta(days=n)
        doc = found.get(day.isoformat(), {})
        days.append(
            DayFigures(
                day=day,
                created=doc.get("created", 0),
                completed=doc.get("completed", 0),
                deleted=doc.get("deleted", 0),
                median_completion_seconds=doc.get("median_seconds"),
                rolled_up_at=doc.get("rolled_up_at"),
            )
        )
    totals = Totals(**{f: sum(getattr(d, f) for d in days) for f in FIGURES})
    return AnalyticsSummary(days=days, totals=totals)
