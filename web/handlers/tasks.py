"""Task handlers."""

from __future__ import annotations

from aiohttp import web

from core import tasks
from core.pagination import PageQuery
from core.store import Doc
from core.task_models import BulkRequest, TaskCreate, TaskQuery, TaskUpdate
from web.conditional import precondition
from web.routing import body, caller, json_response, query

BASE = "/api/v1/tasks"


def _task_response(
    doc: Doc, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return json_response(
        tasks.public(doc), status=status, headers={"ETag": tasks.etag(doc), **(headers or {})}
    )


async def create_task(request: web.Request) -> web.Response:
    """Create a task; answers 201 with ``Location`` and ``ETag``."""
    doc = await tasks.create(*caller(request), body(request, TaskCreate))
    return _task_response(doc, 201, {"Location": f"{BASE}/{doc['_id']}"})


async def list_tasks(request: web.Request) -> web.Response:
    """List the caller's tasks with filters, a sort and cursor pagination."""
    body = await tasks.list_page_json(*caller(request), query(request, TaskQuery))
    return web.Response(body=body, content_type="application/json")


async def get_task(request: web.Request) -> web.Response:
    """One task; ``If-None-Match`` with its current ETag answers 304."""
    inm = precondition(request, "If-None-Match")
    doc = await tasks.get(*caller(request), request.match_info["id"])
    tag = tasks.etag(doc)
    if inm is not None and inm.weak_match(tag):
        return web.Response(status=304, headers={"ETag": tag})
    return _task_response(doc)


def _if_match(request: web.Request) -> str | None:
    """``If-Match`` for :mod:`core.tasks` (400 when malformed): ``*``, or the strong tags that
    could equal a task's ETag. Weak tags never match (strong comparison) and ours hold no
    comma, so both are dropped; when nothing is left, ``""`` (an ETag no task has) makes the
    request fail its precondition (412) as RFC 9110 says."""
    parsed = precondition(request, "If-Match")
    if parsed is None:
        return None
    if parsed.any:
        return "*"
    strong = [t for t in parsed.tags if not t.startswith("W/") and "," not in t]
    return ", ".join(strong) or '""'


async def patch_task(request: web.Request) -> web.Response:
    """Change some fields; with ``If-Match``, only if the task is still at that version (412)."""
    doc = await tasks.update(
        *caller(request),
        request.match_info["id"],
        body(request, TaskUpdate).changes(),
        _if_match(request),
    )
    return _task_response(doc)


async def delete_task(request: web.Request) -> web.Response:
    """Delete a task; with ``If-Match``, only if still at that version (412)."""
    await tasks.delete(*caller(request), request.match_info["id"], _if_match(request))
    return web.Response(status=204)


async def bulk_tasks(request: web.Request) -> web.Response:
    """Set fields on, or delete, up to 500 tasks; one result per id."""
    result = await tasks.bulk(*caller(request), body(request, BulkRequest))
    return json_response(result)


async def task_activity(request: web.Request) -> web.Response:
    """A task's history, newest first."""
    page = await tasks.activity(
        *caller(request), request.match_info["id"], query(request, PageQuery)
    )
    return json_response(page)


async def task_stats(request: web.Request) -> web.Response:
    """Counts by status and priority, overdue and due today (UTC); cached, never stale."""
    body, hit = await tasks.stats_json(*caller(request))
    return web.Response(
        body=body, content_type="application/json", headers={"X-Cache": "hit" if hit else "miss"}
    )
