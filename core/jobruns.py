"""Runs of scheduled jobs: what the scheduler fired and how the worker's run went.

The scheduler records a run as ``enqueued`` under its fire key; the actor marks it ``running``,
then ``succeeded`` or ``failed`` with its duration. ``/admin/schedules`` shows the latest run
of each job from here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pymongo import DESCENDING, ReturnDocument
from pymongo.errors import DuplicateKeyError

from core.context import Context
from core.store import Doc, utcnow

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


async def start(ctx: Context, job: str, fire_key: str) -> Doc | None:
    """Mark a run started; ``None`` if this fire already succeeded (a redelivered message)."""
    try:
        return await ctx.store["job_runs"].find_one_and_update(
            {"_id": fire_key, "status": {"$ne": "succeeded"}},
            {
                "$set": {"job": job, "status": "running", "started_at": utcnow()},
                "$setOnInsert": {"enqueued_at": utcnow(), "manual": False},
                "$inc": {"attempts": 1},
            },
            upsert=True,
            return_document=ReturnDocument.AFTER,
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
