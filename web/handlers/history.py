"""Operator history: processed and failed messages over the last hour or day (kept in Redis by
the workers, core/history.py), and the recent runs of a scheduled job (``job_runs``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from core import jobruns
from core.errors import NotFound
from core.history import HistoryQuery, history_summary
from web.keys import CONTEXT
from web.routing import json_response, query
from workers.catalogue import CATALOGUE

#: Most runs one request may ask for.
MAX_RUNS = 100


async def get_history(request: web.Request) -> web.Response:
    """Processed and failed counts per queue and per actor: ``window=1h`` by minute (60
    points), ``window=24h`` by 10 minutes (144 points); oldest first, missing minutes are 0."""
    window = query(request, HistoryQuery).window
    return json_response(await history_summary(request.app[CONTEXT], window))


class RunsQuery(BaseModel):
    """How many runs (the latest first)."""

    model_config = ConfigDict(extra="forbid")

    limit: int = Field(20, ge=1, le=MAX_RUNS)


class ScheduleRun(BaseModel):
    """One run of a scheduled job."""

    fire_key: str
    scheduled_for: datetime | None = Field(description="The slot it fired for (null: manual)")
    enqueued_at: datetime | None = Field(description="When it was fired")
    status: str = Field(description="enqueued, running, succeeded or failed")
    started_at: datetime | None
    finished_at: datetime | None
    duration_seconds: float | None
    error: str | None
    manual: bool


class ScheduleRuns(BaseModel):
    """A scheduled job's latest runs, newest first (runs are kept 30 days)."""

    items: list[ScheduleRun]


def run_out(run: dict[str, Any]) -> ScheduleRun:
    """A ``job_runs`` document as the API shows it."""
    duration_ms = run.get("duration_ms")
    return ScheduleRun(
        fire_key=str(run["_id"]),
        scheduled_for=run.get("scheduled_for"),
        enqueued_at=run.get("enqueued_at"),
        status=str(run.get("status", "enqueued")),
        started_at=run.get("started_at"),
        finished_at=run.get("finished_at"),
        duration_seconds=None if duration_ms is None else duration_ms / 1000,
        error=run.get("error"),
        manual=bool(run.get("manual")),
    )


async def list_schedule_runs(request: web.Request) -> web.Response:
    """The latest runs of one scheduled job, newest first; 404 for a name not in the schedule."""
    ctx = request.app[CONTEXT]
    name = request.match_info["name"]
    limit = query(request, RunsQuery).limit
    if (
        name not in CATALOGUE.schedule
        and await ctx.store["schedules"].find_one({"_id": name}) is None
    ):
        raise NotFound(f"No scheduled job named {name!r}")
    runs = await jobruns.recent(ctx, name, limit)
    return json_response(ScheduleRuns(items=[run_out(run) for run in runs]))
