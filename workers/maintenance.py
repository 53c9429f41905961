"""Maintenance actors, one per scheduled job (jobs/schedule.py), and the one way to enqueue a
job's run.

A run message carries a :class:`JobRun`. Each actor is a body decorated with :func:`recorded`,
which records the run in ``job_runs`` (start, finish, duration, error, the body's result
summary) and skips a fire key that already succeeded, so a redelivered message does its work
once.
"""

from __future__ import annotations

import asyncio
import functools
import traceback
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import dramatiq
from pydantic import BaseModel, ConfigDict

from core import analytics, backups, jobruns, notifications
from core.context import Context
from core.store import utcnow
from workers.actors import ActorContext

QUEUE = "maintenance"
#: Time limit of a maintenance actor (the catalogue's default for this queue).
TIME_LIMIT_MS = 30 * 60_000
#: A full logical backup of a large database outlasts :data:`TIME_LIMIT_MS`.
BACKUP_TIME_LIMIT_MS = 6 * 3600_000


class JobRun(BaseModel):
    """The message of one run of a scheduled job (built by :func:`enqueue_run`)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    job: str
    fire_key: str
    scheduled_for: datetime
    #: The backup requested over HTTP (``run_backup`` only; a scheduled backup has none).
    backup_id: str | None = None


#: A maintenance body: does the work, returns a summary for ``job_runs``.
Body = Callable[[ActorContext, JobRun], Awaitable[dict[str, Any]]]


def recorded(body: Body) -> Callable[[ActorContext, JobRun], Awaitable[None]]:
    """The maintenance actor running ``body`` (same name) with its run recorded in
    ``job_runs``; a fire key that already succeeded is skipped."""

    @functools.wraps(body)
    async def run_job(ctx: ActorContext, run: JobRun) -> None:
        started = await jobruns.start(ctx, run.job, run.fire_key)
        if started is None:
            return  # this fire already succeeded: a redelivered message
        try:
            result = await body(ctx, run)
        except Exception as exc:
            await jobruns.finish(
                ctx,
                run.fire_key,
                started["started_at"],
                error="".join(traceback.format_exception_only(exc)).strip(),
            )
            raise
        await jobruns.finish(ctx, run.fire_key, started["started_at"], result=result)

    return run_job


@recorded
async def send_due_soon_reminders(ctx: ActorContext, run: JobRun) -> dict[str, Any]:
    """Remind users of open tasks due within their window (email and in-app)."""
    sent = await notifications.send_due_soon_reminders(ctx, ctx.mailer)
    return {"reminders": sent}


@recorded
async def rollup_analytics(ctx: ActorContext, run: JobRun) -> dict[str, Any]:
    """Recompute the per-day analytics of yesterday and today."""
    days = await analytics.rollup_recent(ctx)
    return {"days": days}


@recorded
async def run_backup(ctx: ActorContext, run: JobRun) -> dict[str, Any]:
    """Take a full backup: the one requested over HTTP (``backup_id``) or a scheduled one."""
    backup_id = run.backup_id or backups.id_for_fire(run.fire_key, run.scheduled_for)
    result = await backups.create(ctx, backup_id, fire_key=run.fire_key)
    return {
        "backup_id": result.id,
        "collections": len(result.collections),
        "documents": result.documents,
        "bytes": result.size,
        "read_mode": result.read_mode,
        "pruned": result.pruned,
    }


async def enqueue_run(
    ctx: Context,
    broker: dramatiq.Broker,
    job: str,
    actor: str,
    *,
    fire_key: str | None = None,
    scheduled_for: datetime | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """Record and enqueue one run of a scheduled job; returns its fire key. Manual runs
    (``fire_key`` None) get a unique key. ``extra`` (plain JSON) is merged into the payload
    the maintenance body receives as ``run`` (e.g. the id of a backup requested over HTTP)."""
    manual = fire_key is None
    key = fire_key or f"{job}:manual:{uuid.uuid4().hex[:12]}"
    await jobruns.record_enqueued(ctx, job, key, manual=manual)
    payload = {
        **(extra or {}),
        "job": job,
        "fire_key": key,
        "scheduled_for": (scheduled_for or utcnow()).isoformat(),
    }
    await asyncio.to_thread(broker.get_actor(actor).send, payload)
    return key
