"""Operator endpoints for one message at a time and for pausing queues: browse a queue's ready
and delayed messages, find a message by id, retry one now, delete one, a dead letter's detail
(its traceback with our frames first) and deletion, pause and resume.

The work is :mod:`workers.queue_admin` (and :mod:`workers.queue_messages`,
:mod:`workers.pause`), run on a thread like every inspector call (web/handlers/admin.py).
On RabbitMQ, reading ready or delayed messages answers 501 (workers/queue_admin_rabbitmq.py).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, Field

from config.logging import get_logger
from core.pagination import Page, PageQuery
from web.handlers.admin import _call, _inspector
from web.routing import claims, json_response, query
from workers.queue_messages import MessageDetail, MessageSummary

log = get_logger(__name__)


class MessagesQuery(PageQuery):
    """Which messages of a queue to list."""

    state: Literal["ready", "delayed"] = Field(
        "ready",
        description="ready: in the order workers take them (index 0 next); delayed: retries "
        "waiting for their backoff and delayed sends, soonest first",
    )


# workers.queue_messages' dataclasses: pydantic validates and documents them as they are.
class MessagePage(Page[MessageSummary]):
    """A page of a queue's ready or delayed messages."""


# The pydantic mypy plugin's synthesized __init__ takes **kwargs: the field's name clashes.
class MessageOut(BaseModel):  # type: ignore[no-redef]
    """One message in any state (ready, delayed, in_progress, dead)."""

    id: str = Field(description="The broker's id of this enqueue (retry and delete take it)")
    message_id: str = Field(description="Dramatiq's message id, kept across retries")
    queue: str
    actor: str
    state: Literal["ready", "delayed", "in_progress", "dead"]
    enqueued_at: datetime
    eta: datetime | None = Field(description="When a delayed message becomes ready")
    retries: int
    args: list[Any]
    kwargs: dict[str, Any]
    options: dict[str, Any]
    error: str | None
    traceback: str | None = Field(
        description="Our frames (core/, workers/, jobs/, web/, cli/) first, marked '>', "
        "then Dramatiq's and the libraries'"
    )
    failed_at: datetime | None


class RetriedOut(BaseModel):
    """Where a retried message is now: at the head of its ready list."""

    id: str = Field(description="Its id now (a delayed or dead message gets a new one)")
    queue: str
    state: Literal["ready"] = "ready"


class PauseOut(BaseModel):
    """A queue's pause state (workers see a change within a second)."""

    queue: str
    paused: bool
    changed: bool = Field(description="False when it already was in that state")


def _out(detail: MessageDetail) -> MessageOut:
    return MessageOut.model_validate(detail, from_attributes=True)


async def list_messages(request: web.Request) -> web.Response:
    """A page of a queue's ready or delayed messages."""
    q = query(request, MessagesQuery)
    page = await _call(
        _inspector(request).messages,
        request.match_info["queue"],
        q.state,
        limit=q.limit,
        cursor=q.cursor,
    )
    return json_response(MessagePage(items=page.items, next_cursor=page.next_cursor))


async def get_message(request: web.Request) -> web.Response:
    """A message by id (the broker's or Dramatiq's), in any queue and state."""
    return json_response(_out(await _call(_inspector(request).find, request.match_info["id"])))


async def retry_message(request: web.Request) -> web.Response:
    """Retry now: ready or delayed to the head of the ready list, dead replayed."""
    queue, rid = request.match_info["queue"], request.match_info["id"]
    new_id = await _call(_inspector(request).retry_message, queue, rid)
    log.info(
        "admin.message_retried", queue=queue, id=rid, new_id=new_id, by=claims(request).subject
    )
    return json_response(RetriedOut(id=new_id, queue=queue))


async def delete_message(request: web.Request) -> web.Response:
    """Delete one ready, delayed or dead message."""
    queue, rid = request.match_info["queue"], request.match_info["id"]
    await _call(_inspector(request).delete_message, queue, rid)
    log.info("admin.message_deleted", queue=queue, id=rid, by=claims(request).subject)
    return web.Response(status=204)


async def get_dead(request: web.Request) -> web.Response:
    """One dead letter, its traceback with our frames first."""
    queue, rid = request.match_info["queue"], request.match_info["id"]
    return json_response(_out(await _call(_inspector(request).dead_detail, queue, rid)))


async def delete_dead(request: web.Request) -> web.Response:
    """Drop one dead letter."""
    queue, rid = request.match_info["queue"], request.match_info["id"]
    await _call(_inspector(request).delete_dead, queue, rid)
    log.info("admin.dead_deleted", queue=queue, id=rid, by=claims(request).subject)
    return web.Response(status=204)


async def _set_paused(request: web.Request, paused: bool) -> web.Response:
    queue = request.match_info["queue"]
    changed = await _call(_inspector(request).set_paused, queue, paused)
    log.info(
        "admin.queue_paused" if paused else "admin.queue_resumed",
        queue=queue,
        changed=changed,
        by=claims(request).subject,
    )
    return json_response(PauseOut(queue=queue, paused=paused, changed=changed))


async def pause_queue(request: web.Request) -> web.Response:
    """Pause a queue: workers take none of its messages until it is resumed."""
    return await _set_paused(request, True)


async def resume_queue(request: web.Request) -> web.Response:
    """Resume a paused queue."""
    return await _set_paused(request, False)
