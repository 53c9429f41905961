"""Maintenance actors fired by scheduled jobs, and the one way to enqueue a job's run.

A run message carries ``{job, fire_key, scheduled_for}``. The actor records its run in
``job_runs`` (start, finish, duration, error) and skips a fire key that already succeeded, so a
redelivered message does its work once.
"""

from __future__ import annotations

import asyncio
import traceback
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, overload

import dramatiq

from core import jobruns
from core.context import Context
from core.store import utcnow
from workers.actors import DeclareOne
from workers.resources import WorkerResources

QUEUE = "maintenance"
Run = dict[str, Any]
#: Maintenance work by actor name: ``async (ctx, res, run) -> result summary``.
Work = Callable[[Context, WorkerResources, Run], Awaitable[dict[str, Any]]]
WORK: dict[str, Work] = {}


#: Time limit of each maintenance body, by actor name (default 30 minutes).
TIME_LIMITS_MS: dict[str, int] = {}
DEFAULT_TIME_LIMIT_MS = 30 * 60_000


@overload
def maintenance(fn: Work) -> Work: ...
@overload
def maintenance(*, time_limit_ms: int) -> Callable[[Work], Work]: ...


def maintenance(
    fn: Work | None = None, *, time_limit_ms: int = DEFAULT_TIME_LIMIT_MS
) -> Work | Callable[[Work], Work]:
    """Register ``fn`` as the body of the maintenance actor of the same name
    (``@maintenance`` or ``@maintenance(time_limit_ms=...)``)."""

    def register(body: Work) -> Work:
        WORK[body.__name__] = body
        TIME_LIMITS_MS[body.__name__] = time_limit_ms
        return body

    return register(fn) if fn is not None else register


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


def declare(declare_one: DeclareOne, res: WorkerResources) -> None:
    """Declare one actor per registered maintenance body."""
    from workers import maintenance_jobs  # noqa: F401  (registers the bodies)

    for name, work in WORK.items():
        declare_one(QUEUE, _actor(name, work, res), max_retries=3, time_limit=TIME_LIMITS_MS[name])


def _actor(name: str, work: Work, res: WorkerResources) -> Callable[[Run], Awaitable[None]]:
    async def run_job(run: Run) -> None:
        ctx = await res.context()
        started = await jobruns.start(ctx, run["job"], run["fire_key"])
        if started is None:
            return  # this fire already succeeded: a redelivered message
        try:
            result = await work(ctx, res, run)
        except Exception as exc:
            await jobruns.finish(
                ctx,
                run["fire_key"],
                started["started_at"],
                error="".join(traceback.format_exception_only(exc)).strip(),
            )
            raise
        await jobruns.finish(ctx, run["fire_key"], started["started_at"], result=result)

    run_job.__name__ = name
    run_job.__qualname__ = name
    return run_job
