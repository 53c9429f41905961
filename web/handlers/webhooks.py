"""Webhook handlers: register, list, delete, and the delivery log with redelivery."""

from __future__ import annotations

from aiohttp import web

from core import webhooks
from core.pagination import PageQuery
from web.routing import body, caller, json_response, query

BASE = "/api/v1/webhooks"


async def create_webhook(request: web.Request) -> web.Response:
    """Register a webhook; the answer is the only one that carries its signing secret."""
    doc, secret = await webhooks.create(*caller(request), body(request, webhooks.WebhookCreate))
    created = webhooks.WebhookCreated(**webhooks.public(doc).model_dump(), secret=secret)
    return json_response(
        created,
        status=201,
        headers={"Location": f"{BASE}/{doc['_id']}", "Cache-Control": "no-store"},
    )


async def list_webhooks(request: web.Request) -> web.Response:
    """The caller's webhooks, newest first (cursor pagination)."""
    page = await webhooks.list_page(*caller(request), query(request, PageQuery))
    return json_response(page)


async def get_webhook(request: web.Request) -> web.Response:
    """One webhook (without its secret)."""
    doc = await webhooks.get(*caller(request), request.match_info["id"])
    return json_response(webhooks.public(doc))


async def delete_webhook(request: web.Request) -> web.Response:
    """Delete a webhook and its delivery log."""
    await webhooks.delete(*caller(request), request.match_info["id"])
    return web.Response(status=204)


async def list_webhook_deliveries(request: web.Request) -> web.Response:
    """A webhook's deliveries: status, attempts, response code; newest event first."""
    page = await webhooks.deliveries_page(
        *caller(request), request.match_info["id"], query(request, PageQuery)
    )
    return json_response(page)


async def redeliver_webhook_delivery(request: web.Request) -> web.Response:
    """Send a delivery again (whatever its status); answers 202 with it back at ``pending``."""
    doc = await webhooks.request_redelivery(
        *caller(request), request.match_info["id"], request.match_info["delivery_id"]
    )
    return json_response(webhooks.delivery_public(doc), status=202)


async def resume_webhook(request: web.Request) -> web.Response:
    """Make a webhook the circuit breaker paused ``active`` again (idempotent) and send its
    held deliveries again, oldest first (up to 1,000 per request; call again for more)."""
    doc, sent = await webhooks.resume(*caller(request), request.match_info["id"])
    resumed = webhooks.WebhookResumed(**webhooks.public(doc).model_dump(), redelivered=sent)
    return json_response(resumed)
