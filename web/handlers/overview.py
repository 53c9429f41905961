"""The operator's summaries: ``GET /admin/health`` (is the platform well, check by check) and
``GET /admin/overview`` (everything the dashboard shows, in one call it polls).

The overview reads the queues and the worker registrations once and hands them to the health
checks (workers/health.py), so a poll costs one broker reading, one registry reading and a few
MongoDB counts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import datetime
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, Field
from redis.exceptions import RedisError

from core import jobruns
from core.errors import Unavailable
from core.history import History, history_summary
from web.handlers import admin
from web.keys import CONTEXT, PLATFORM
from web.routing import json_response
from workers import health
from workers.backlog import backlog_summary

T = TypeVar("T")


class ScheduleBrief(BaseModel):
    """One scheduled job: when it runs next, how its last run went."""

    name: str
    trigger: str
    actor: str
    next_run_at: datetime | None
    last_status: str | None = Field(description="The last run's status (None: never ran)")
    last_finished_at: datetime | None
    last_error: str | None


class Overview(BaseModel):
    """What the dashboard shows, in one answer."""

    queues: admin.QueueList | None = Field(description="As GET /admin/queues (None: broker down)")
    workers: admin.WorkerList | None = Field(description="As GET /admin/workers (None: Redis down)")
    health: health.PlatformHealth
    schedules: list[ScheduleBrief]
    history: History | None = Field(
        description="The last hour, as GET /admin/history?window=1h (None: Redis down)"
    )
    backlog: dict[str, Any] = Field(description="Users with most messages waiting, per queue")


async def get_health(request: web.Request) -> web.Response:
    """The platform's health: ``ok``, ``degraded`` or ``failing``, and each check (queues
    against their latency objectives, live workers, dead letters, outbox, scheduler leader,
    archiver lag). Always 200: an unreachable service is a failing check, not an error."""
    app = request.app
    return json_response(await health.health_summary(app[CONTEXT], app[PLATFORM].inspector))


async def schedule_briefs(app: web.Application) -> list[ScheduleBrief]:
    """Each scheduled job as the scheduler last published it, with its last run."""
    ctx = app[CONTEXT]
    out = []
    async for doc in ctx.store["schedules"].find().sort("_id", 1):
        run = await jobruns.latest(ctx, doc["_id"])
        out.append(
            ScheduleBrief(
                name=doc["_id"],
                trigger=doc["trigger"],
                actor=doc["actor"],
                next_run_at=doc.get("next_run_at"),
                last_status=run["status"] if run else None,
                last_finished_at=run.get("finished_at") if run else None,
                last_error=run.get("error") if run else None,
            )
        )
    return out


async def _attempt(read: Awaitable[T]) -> T | Unavailable:
    try:
        return await read
    except Unavailable as exc:
        return exc


async def get_overview(request: web.Request) -> web.Response:
    """Queues (with objectives), workers (with what each thread runs), health, schedules, the
    last hour's history and the per-user backlog: what the dashboard polls."""
    app = request.app
    ctx = app[CONTEXT]
    queues, workers, schedules = await asyncio.gather(
        _attempt(admin.queue_list(app)), _attempt(admin.worker_list(app)), schedule_briefs(app)
    )
    summary = await health.health_summary(
        ctx,
        app[PLATFORM].inspector,
        stats=queues if isinstance(queues, Unavailable) else queues.items,
        workers=workers if isinstance(workers, Unavailable) else workers.items,
    )
    history: History | None
    try:
        history = await history_summary(ctx, "1h")
    except RedisError:
        history = None
    backlog = await backlog_summary(ctx)
    return json_response(
        Overview(
            queues=None if isinstance(queues, Unavailable) else queues,
            workers=None if isinstance(workers, Unavailable) else workers,
            health=summary,
            schedules=schedules,
            history=history,
            backlog=backlog,
        )
    )
