"""Operator endpoints for backups: the catalogue, and starting a full backup on a worker."""

from __future__ import annotations

from aiohttp import web

from core import backups
from core.errors import Unavailable
from core.pagination import PageQuery
from web.keys import CONTEXT, PLATFORM
from web.routing import json_response, query
from workers.catalogue import CATALOGUE
from workers.maintenance import enqueue_run
from workers.queue_inspector import backend_errors

#: The scheduled job (jobs/schedule.py) whose maintenance actor takes backups.
JOB = "backup"
ACTOR = CATALOGUE.schedule[JOB]


def location(backup_id: str) -> str:
    """The URL of one backup."""
    return f"/api/v1/admin/backups/{backup_id}"


async def list_backups(request: web.Request) -> web.Response:
    """Backups, newest first: queued, running, succeeded, failed and pruned ones."""
    return json_response(await backups.page(request.app[CONTEXT], query(request, PageQuery)))


async def get_backup(request: web.Request) -> web.Response:
    """One backup: follow a requested one until it succeeds or fails."""
    doc = await backups.get(request.app[CONTEXT], request.match_info["id"])
    return json_response(backups.public(doc))


async def start_backup(request: web.Request) -> web.Response:
    """Record a backup as queued and enqueue its run; a worker takes it (202, ``Location``)."""
    ctx = request.app[CONTEXT]
    doc = await backups.request(ctx)
    try:
        fire_key = await enqueue_run(
            ctx, request.app[PLATFORM].broker, JOB, ACTOR, extra={"backup_id": doc["_id"]}
        )
    except backend_errors() as exc:
        await backups.not_enqueued(ctx, doc["_id"])
        raise Unavailable("The broker is unreachable: the backup was not started") from exc
    await backups.enqueued(ctx, doc["_id"], fire_key)
    return json_response(
        backups.public(doc), status=202, headers={"Location": location(doc["_id"])}
    )
