"""Operator view of the backlog per user: who has the most messages waiting, per queue
(``workers/backlog.py``; with fair dispatch a burst waits in the outbox, ``core/fairness.py``)."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from web.keys import CONTEXT
from web.routing import json_response, query
from workers.backlog import backlog_summary

#: Most users per queue one request may ask for.
MAX_USERS = 100


class BacklogQuery(BaseModel):
    """One queue (every queue when omitted) and how many users per queue."""

    model_config = ConfigDict(extra="forbid")

    queue: str | None = Field(None, max_length=100)
    limit: int = Field(10, ge=1, le=MAX_USERS)


class UserWaiting(BaseModel):
    """One user's messages waiting on one queue."""

    user_id: str
    waiting: int = Field(description="outbox + in_broker")
    outbox: int = Field(description="Not sent yet: held in the outbox (fair dispatch)")
    in_broker: int = Field(description="Sent and not finished (queued, running or retrying)")


class Backlog(BaseModel):
    """The users with the most messages waiting, per queue, most first (queues with nothing
    waiting are left out)."""

    queues: dict[str, list[UserWaiting]]


async def get_backlog(request: web.Request) -> web.Response:
    """The top ``limit`` users by messages waiting on each queue (or on ``queue`` only)."""
    params = query(request, BacklogQuery)
    summary = await backlog_summary(request.app[CONTEXT], queue=params.queue, limit=params.limit)
    return json_response(Backlog.model_validate(summary))
