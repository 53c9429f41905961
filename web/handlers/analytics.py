"""Analytics handler."""

from __future__ import annotations

from aiohttp import web

from core import analytics
from web.routing import caller, json_response, query


async def analytics_summary(request: web.Request) -> web.Response:
    """Per UTC day of the range (inclusive, at most 366 days; default the last 30 days): the
    caller's tasks created, completed and deleted, and the median time to complete the tasks
    completed that day, with totals. Served from the hourly rollups (scheduled job
    ``analytics-rollup``, at :05), so today's figures lag by up to about an hour;
    ``rolled_up_at`` says when each day was computed."""
    q = query(request, analytics.SummaryQuery)
    result = await analytics.summary(*caller(request), q.from_, q.to)
    return json_response(result)
