"""Runs of scheduled jobs: what the scheduler fired and how the worker's run went.

A scheduled slot is claimed by inserting its run (``enqueued``, with ``scheduled_for`` and the
scheduler instance) under its fire key: the unique ``_id`` is what makes two schedulers unable
to fire one slot twice. The scheduler then sends the message and sets ``sent_at``; a claim left
without ``sent_at`` and not yet started by a worker (its scheduler died in between) is sent
again by the next leader, which notes ``resent_by``. That is at least once: a scheduler that
dies after sending but before noting it has its message sent twice, and the actor's check
(:func:`start` skips a fire key that succeeded) and idempotent maintenance bodies absorb the
repeat. Manual runs are recorded by :func:`record_enqueued`. The actor marks a run
``running``, then ``succeeded`` or ``failed`` with its duration. ``/admin/schedules`` shows the
latest run of each job from here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pymongo import ASCENDING, DESCENDING
from pymongo.errors import DuplicateKeyError

from core.context import Context
from core.store import Doc, update_then_read, utcnow

RunStatus = Literal["enqueued", "running", "succeeded", "failed"]


async def record_enqueued(ctx: Context, job: str, fire_key: str, *, manual: bool) -> None:
    """Note that ``job`` was fired (idempotent per fire key)."""
    await ctx.store["job_runs"].update_one(
        {"_id": fire_key},
        {
            "$setOnInsert": {
                "job": job,
                "status": "enqueued",
                "manual": manual,
                "enqueued_at": utcnow(),
            }
        },
        upsert=True,
    )


async def claim(ctx: Context, job: str, fire_key: str, *, scheduled_for: datetime, by: str) -> bool:
    """Claim the scheduled slot ``fire_key`` for scheduler instance ``by``; ``False`` when it
    was claimed before (by any instance)."""
    try:
        await ctx.store["job_runs"].insert_one(
            {
                "_id": fire_key,
                "job": job,
                "status": "enqueued",
                "manual": False,
                "scheduled_for": scheduled_for,
                "fired_by": by,
                "enqueued_at": utcnow(),
            }
        )
    except DuplicateKeyError:
        return False
    return True


async def mark_sent(ctx: Context, fire_key: str, *, resent_by: str | None = None) -> None:
    """Note that the message of a claimed slot went to the broker (``resent_by``: the
    scheduler instance that sent it again for a scheduler that had died)."""
    fields: dict[str, Any] = {"sent_at": utcnow()}
    if resent_by is not None:
        fields["resent_by"] = resent_by
    await ctx.store["job_runs"].update_one({"_id": fire_key}, {"$set": fields})


async def unsent(ctx: Context, job: str, *, since: datetime) -> list[Doc]:
    """Slots of ``job`` claimed since ``since`` whose message may never have been sent (no
    ``sent_at`` and no worker has started them), oldest first."""
    cursor = ctx.store["job_runs"].find(
        {
            "job": job,
            "enqueued_at": {"$gte": since},
            "manual": False,
            "status": "enqueued",
            "scheduled_for": {"$exists": True},
            "sent_at": {"$exists": False},
        },
        sort=[("enqueued_at", ASCENDING)],
    )
    return [doc async for doc in cursor]


async def start(ctx: Context, job: str, fire_key: str) -> Doc | None:
    """Mark a run started; ``None`` if this fire already succeeded (a redelivered message)."""
    try:
        return await update_then_read(
            ctx.store["job_runs"],
            {"_id": fire_key, "status": {"$ne": "succeeded"}},
            {
                "$set": {"job": job, "status": "running", "started_at": utcnow()},
                "$setOnInsert": {"enqueued_at": utcnow(), "manual": False},
                "$inc": {"attempts": 1},
            },
            upsert=True,
        )
    except DuplicateKeyError:  # the upsert met the succeeded record: nothing to do
        return None


async def finish(
    ctx: Context,
    fire_key: str,
    started: datetime,
    *,
    error: str | None = None,
    result: dict[str, Any] | None = None,
) -> None:
    """Mark a run finished."""
    now = utcnow()
    await ctx.store["job_runs"].update_one(
        {"_id": fire_key},
        {
            "$set": {
                "status": "failed" if error else "succeeded",
                "finished_at": now,
                "duration_ms": int((now - started).total_seconds() * 1000),
                "error": error,
                "result": result or {},
            }
        },
    )


async def latest(ctx: Context, job: str) -> Doc | None:
    """The most recent run of ``job``."""
    return await ctx.store["job_runs"].find_one({"job": job}, sort=[("enqueued_at", DESCENDING)])


async def recent(ctx: Context, job: str, limit: int = 20) -> list[Doc]:
    """The latest ``limit`` runs of ``job``, newest first (by when each was fired). Runs are
    kept 30 days (the ``job_runs`` TTL index, core/store.py): at most 8,640 of the 5-minute
    job, a few hundred of the others. Read through the ``job_latest`` index."""
    cursor = ctx.store["job_runs"].find(
        {"job": job}, sort=[("enqueued_at", DESCENDING)], limit=limit
    )
    return [doc async for doc in cursor]
