"""Operations endpoints: liveness, readiness, metrics, OpenAPI, docs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from importlib.resources import files

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from core.errors import Unavailable
from web.handlers.admin import refresh_queue_metrics
from web.keys import CONTEXT, OPENAPI
from web.routing import json_response

READY_TIMEOUT = 2.0


class Health(BaseModel):
    """Liveness / readiness answer."""

    status: str
    checks: dict[str, str] = {}


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return json_response(Health(status="ok"))


async def readyz(request: web.Request) -> web.Response:
    """Readiness: MongoDB and Redis answer; 503 naming what failed."""
    ctx = request.app[CONTEXT]
    checks: dict[str, str] = {}

    async def check(name: str, probe: Awaitable[object]) -> None:
        try:
            await asyncio.wait_for(probe, READY_TIMEOUT)
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"unreachable: {type(exc).__name__}"

    await asyncio.gather(check("mongodb", ctx.store.ping()), check("redis", ctx.redis.ping()))
    failed = [name for name, state in checks.items() if state != "ok"]
    if failed:
        raise Unavailable(f"Not ready: {', '.join(failed)} unreachable")
    return json_response(Health(status="ready", checks=checks))


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition (queue depths read on a thread first, see handlers/admin.py)."""
    await refresh_queue_metrics(request.app)
    response = web.Response(body=generate_latest())
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return response


async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document of this API."""
    return json_response(request.app[OPENAPI])


async def docs(request: web.Request) -> web.Response:
    """Swagger UI, served from the swagger-ui-bundle package (no network fetch)."""
    page = files("web").joinpath("static/docs.html").read_text()
    return web.Response(text=page, content_type="text/html")
