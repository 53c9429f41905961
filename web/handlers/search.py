"""Search handler."""

from __future__ import annotations

from aiohttp import web

from core import search
from web.routing import caller, json_response, query


async def search_tasks(request: web.Request) -> web.Response:
    """The caller's tasks matching every word of ``q`` (each word as a prefix: "gro mil" finds
    "Buy groceries and milk"), best first: title over tags over description, whole words over
    prefixes, then the most recently updated. Eventually consistent: a write is searchable
    within about a second. Returns the best ``limit`` hits (no cursor)."""
    q = query(request, search.SearchQuery)
    result = await search.search(*caller(request), q.q, q.limit)
    return json_response(result)
