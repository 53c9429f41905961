"""Operations endpoints: liveness, readiness, metrics, OpenAPI, docs."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import re
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from core.errors import Unavailable
from core.events import OutboxLag, outbox_lag
from web.handlers.admin import QUEUE_METRICS, refresh_queue_metrics
from web.keys import CONTEXT, OPENAPI
from web.metrics import scrape_registry
from web.ratelimit import spend_operations_budget
from web.routing import json_response

READY_TIMEOUT = 2.0
#: How long one readiness answer is reused (seconds). ``/readyz`` is unauthenticated and
#: unlimited (probes must never be throttled), so a flood of it must not become a flood of
#: pings to MongoDB and Redis: every caller within this window gets the same answer, and
#: callers arriving while a check runs wait for that one check.
READY_CACHE_SECONDS = 1.0


class Health(BaseModel):
    """Liveness / readiness answer; readiness adds the outbox's lag (a stalled relay shows
    here at once: ``oldest_pending_age_seconds`` grows, ``set_aside`` counts poison events)."""

    status: str
    checks: dict[str, str] = {}
    outbox: OutboxLag | None = None


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return json_response(Health(status="ok"))


@dataclass
class Readiness:
    """An app's last readiness result and the check under way, if any (see
    :data:`READY_CACHE_SECONDS`); ``create_app`` gives each app one."""

    checked_at: float = float("-inf")
    checks: Health | None = None
    running: asyncio.Task[Health] | None = None


READINESS = web.AppKey("readiness", Readiness)


async def _check_dependencies(request: web.Request) -> Health:
    ctx = request.app[CONTEXT]
    checks: dict[str, str] = {}

    async def check(name: str, probe: Awaitable[object]) -> None:
        try:
            await asyncio.wait_for(probe, READY_TIMEOUT)
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"unreachable: {type(exc).__name__}"

    await asyncio.gather(check("mongodb", ctx.store.ping()), check("redis", ctx.redis.ping()))
    lag = None
    if checks["mongodb"] == "ok":
        with contextlib.suppress(Exception):
            lag = await asyncio.wait_for(outbox_lag(ctx), READY_TIMEOUT)
    failed = [name for name, state in checks.items() if state != "ok"]
    return Health(status="not ready" if failed else "ready", checks=checks, outbox=lag)


async def _readiness(request: web.Request) -> Health:
    """The dependencies' state, at most :data:`READY_CACHE_SECONDS` old, one check at a time."""
    state = request.app[READINESS]
    if state.checks is not None and time.monotonic() - state.checked_at < READY_CACHE_SECONDS:
        return state.checks
    task = state.running
    if task is None:
        task = state.running = asyncio.create_task(_check_dependencies(request))

        def record(done: asyncio.Task[Health]) -> None:
            state.running = None
            if not done.cancelled() and done.exception() is None:
                state.checks, state.checked_at = done.result(), time.monotonic()

        task.add_done_callback(record)
    # Shielded: a caller that goes away does not cancel the check the others wait for.
    return await asyncio.shield(task)


async def readyz(request: web.Request) -> web.Response:
    """Readiness: MongoDB and Redis answer; 503 naming what failed. The answer may be up to
    :data:`READY_CACHE_SECONDS` old (see there). The outbox's lag is a detail, not a
    condition: a stalled relay is not cured by taking this replica out of rotation."""
    health = await _readiness(request)
    failed = [name for name, state in health.checks.items() if state != "ok"]
    if failed:
        raise Unavailable(f"Not ready: {', '.join(failed)} unreachable")
    return json_response(health)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition (queue depths read on a thread first, see handlers/admin.py); in
    a child of ``taskmanager web --processes N``, the merge of the group's processes
    (``web/metrics.py``).

    Public, so limited per address (generously: web/ratelimit.py ``OPERATIONS_POLICY``)."""
    await spend_operations_budget(request)
    await refresh_queue_metrics(request.app)
    response = web.Response(body=generate_latest(scrape_registry(QUEUE_METRICS)))
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return response


async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document of this API (limited per address, as ``/metrics``)."""
    await spend_operations_budget(request)
    return json_response(request.app[OPENAPI]())


def _inline_script_hashes(page: str) -> str:
    """CSP sources allowing exactly the page's inline scripts (``'sha256-…'``)."""
    return " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
        for body in re.findall(r"<script>(.*?)</script>", page, flags=re.DOTALL)
    )


@cache
def docs_page() -> tuple[str, dict[str, str]]:
    """The Swagger UI page and its security headers.

    Scripts run only from this server, the page's own inline start-up script by its hash;
    Swagger UI's inline styles and its ``data:`` icons are allowed, nothing else is. The page
    cannot be framed, is not sniffed, sends no referrer, and (``persistAuthorization: false``)
    keeps a token typed into "Authorize" in memory only, never in localStorage.
    """
    page = files("web").joinpath("static/docs.html").read_text(encoding="utf-8")
    policy = "; ".join(
        (
            "default-src 'self'",
            f"script-src 'self' {_inline_script_hashes(page)}",
            "style-src 'self' 'unsafe-inline'",
            "img-src 'self' data:",
            "connect-src 'self'",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        )
    )
    headers = {
        "Content-Security-Policy": policy,
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }
    return page, headers


async def docs(request: web.Request) -> web.Response:
    """Swagger UI, served from the swagger-ui-bundle package (no network fetch)."""
    page, headers = docs_page()
    return web.Response(text=page, content_type="text/html", headers=headers)
