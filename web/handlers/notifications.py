"""In-app notification handlers: the feed and marking one read."""

from __future__ import annotations

from aiohttp import web

from core import notifications
from web.routing import caller, json_response, query


async def list_notifications(request: web.Request) -> web.Response:
    """The caller's notifications, newest first; ``unread=true`` for unread only."""
    page = await notifications.list_page(
        *caller(request), query(request, notifications.NotificationQuery)
    )
    return json_response(page)


async def read_notification(request: web.Request) -> web.Response:
    """Mark one of the caller's notifications read (idempotent); 404 for anyone else's."""
    doc = await notifications.mark_read(*caller(request), request.match_info["id"])
    return json_response(notifications.public(doc))
