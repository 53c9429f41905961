"""Operator view of the schedule: what runs when, how the last run went, who leads."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from core import jobruns
from core.errors import NotFound
from web.keys import CONTEXT, PLATFORM
from web.routing import json_response
from workers.maintenance import enqueue_run


class LastRun(BaseModel):
    """The most recent run of a scheduled job."""

    fire_key: str
    status: str
    manual: bool
    enqueued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    duration_ms: int | None
    error: str | None


class ScheduleEntry(BaseModel):
    """One scheduled job as the scheduler last published it."""

    name: str
    description: str
    trigger: str
    actor: str
    next_run_at: datetime | None
    last_run: LastRun | None


class ScheduleList(BaseModel):
    """The schedule and the instance that leads the scheduler replicas."""

    leader: str | None
    items: list[ScheduleEntry]


class RunStarted(BaseModel):
    """A manual run was enqueued."""

    name: str
    fire_key: str


def _last(run: dict[str, Any] | None) -> LastRun | None:
    if run is None:
        return None
    return LastRun(
        fire_key=run["_id"],
        status=run["status"],
        manual=bool(run.get("manual")),
        enqueued_at=run.get("enqueued_at"),
        started_at=run.get("started_at"),
        finished_at=run.get("finished_at"),
        duration_ms=run.get("duration_ms"),
        error=run.get("error"),
    )


async def list_schedules(request: web.Request) -> web.Response:
    """Each scheduled job: trigger, next run, last run (status, duration); and the leader."""
    ctx = request.app[CONTEXT]
    leader = await ctx.redis.get(ctx.key("scheduler", "leader"))
    items = []
    async for doc in ctx.store["schedules"].find().sort("_id", 1):
        items.append(
            ScheduleEntry(
                name=doc["_id"],
                description=doc.get("description", ""),
                trigger=doc["trigger"],
                actor=doc["actor"],
                next_run_at=doc.get("next_run_at"),
                last_run=_last(await jobruns.latest(ctx, doc["_id"])),
            )
        )
    return json_response(
        ScheduleList(leader=leader.decode() if isinstance(leader, bytes) else None, items=items)
    )


async def run_schedule(request: web.Request) -> web.Response:
    """Fire one scheduled job now; follow it in ``GET /admin/schedules`` (last run)."""
    ctx = request.app[CONTEXT]
    name = request.match_info["name"]
    doc = await ctx.store["schedules"].find_one({"_id": name})
    if doc is None:
        raise NotFound(f"No scheduled job named {name!r}")
    key = await enqueue_run(ctx, request.app[PLATFORM].broker, name, doc["actor"])
    return json_response(RunStarted(name=name, fire_key=key), status=202)
