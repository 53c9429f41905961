"""Cross-cutting request behaviour: request id, access log and metrics, problem+json errors
(503 while a store is unreachable: web/outages.py), security headers on every answer.

The app has one middleware, :func:`request_context` (two behind trusted proxies:
:func:`real_client` first), which calls :func:`problems` itself, and one response-prepare
callback (``web/app.py``): each aiohttp middleware and signal is a layer every request
crosses, and measured side by side (``python -m bench api --trials``) the three middlewares,
two callbacks and an access-log call made below ``LOG_LEVEL`` cost 15 % of a cached read's CPU.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import time
from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from config.logging import get_logger
from core.errors import AppError, PayloadTooLarge
from web.keys import REQ_ID, SETTINGS
from web.metrics import HTTP_ERRORS, HTTP_LATENCY, HTTP_REQUESTS
from web.outages import OUTAGES
from web.problem import from_app_error, problem_response

log = get_logger("web")
#: The access line's stdlib logger: asked first, so a request below ``LOG_LEVEL`` (WARNING in
#: production) does not build the line at all.
_ACCESS = logging.getLogger("web")
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _route_name(request: web.Request) -> str:
    info = request.match_info
    resource = info.route.resource if info.route is not None else None
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give the request an id (the client's if sane), answer errors as problems
    (:func:`problems`), log it, count it, time it."""
    incoming = request.headers.get("X-Request-ID", "")
    request_id = incoming if _SANE_ID.match(incoming) else os.urandom(16).hex()
    request[REQ_ID] = request_id
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    started = time.perf_counter()
    status = 500
    try:
        response = await problems(request, handler)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        elapsed = time.perf_counter() - started
        route = _route_name(request)
        _count(request.method, route, status, elapsed)
        if _ACCESS.isEnabledFor(logging.INFO) and route not in ("/metrics", "/healthz"):
            log.info(
                "http.request",
                method=request.method,
                path=request.path,
                status=status,
                ms=round(elapsed * 1000, 2),
            )


#: (method, route, status) -> the two metric children it updates: ``labels()`` costs more
#: than the update itself. Bounded: methods are client-chosen, so past the cap it looks up.
_CHILDREN: dict[tuple[str, str, int], tuple[Any, Any]] = {}
_CHILDREN_MAX = 2000


def _count(method: str, route: str, status: int, elapsed: float) -> None:
    children = _CHILDREN.get((method, route, status))
    if children is None:
        children = HTTP_REQUESTS.labels(method, route, str(status)), HTTP_LATENCY.labels(route)
        if len(_CHILDREN) < _CHILDREN_MAX:
            _CHILDREN[method, route, status] = children
    children[0].inc()
    children[1].observe(elapsed)


async def problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every error as problem+json; unexpected ones as a bare 500 that leaks nothing.
    (Called by :func:`request_context`, not a middleware of its own.)

    A store that cannot be reached is a 503 with ``Retry-After``, and while MongoDB is down the
    API refuses at once (web/outages.py)."""
    request_id = request.get(REQ_ID)
    outages = request.app.get(OUTAGES)
    try:
        refusal = outages.refusal(request) if outages is not None else None
        if refusal is not None:
            raise refusal
        response = await handler(request)
    except AppError as exc:
        response = from_app_error(exc, request_id=request_id, instance=request.path)
    except web.HTTPRequestEntityTooLarge:
        exc2 = PayloadTooLarge(f"Body exceeds {request.app[SETTINGS].max_body_size} bytes")
        response = from_app_error(exc2, request_id=request_id, instance=request.path)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = problem_response(
            exc.status,
            exc.reason,
            _http_detail(exc),
            slug=exc.reason.lower().replace(" ", "-"),
            request_id=request_id,
            instance=request.path,
            headers={k: v for k, v in exc.headers.items() if k in ("Allow",)},
        )
    except Exception as exc:
        unavailable = outages.failed(exc) if outages is not None else None
        if unavailable is not None:
            response = from_app_error(unavailable, request_id=request_id, instance=request.path)
        else:
            HTTP_ERRORS.inc()
            log.exception("http.unhandled_error", method=request.method, path=request.path)
            response = problem_response(
                500,
                "Internal Server Error",
                "An unexpected error occurred; quote the request id when reporting it",
                slug="internal",
                request_id=request_id,
            )
    if request_id:
        response.headers["X-Request-ID"] = request_id
    return response


#: What the ``Server`` field says: no framework or language versions.
SERVER = "taskmanager"


def security_headers(response: web.StreamResponse) -> None:
    """Every answer (API, errors, static files, pages): ``Server`` without versions and
    ``X-Content-Type-Options: nosniff`` (a JSON or text answer is never run as a script or
    page). The HTML pages add their own Content-Security-Policy and framing rules."""
    response.headers["Server"] = SERVER
    response.headers.setdefault("X-Content-Type-Options", "nosniff")


def _http_detail(exc: web.HTTPException) -> str:
    if exc.status == 404:
        return "No such resource"
    if exc.status == 405:
        return "Method not allowed on this resource"
    return exc.reason


def real_client(trusted: list[str]) -> Middleware:
    """Believe ``X-Forwarded-For`` only from trusted proxies: the client is the right-most
    address not itself a trusted proxy (entries left of it could be forged by the client).
    Installed only when ``TRUSTED_PROXIES`` names some."""
    networks = [ipaddress.ip_network(n, strict=False) for n in trusted]

    def is_trusted(addr: str | None) -> bool:
        try:
            ip = ipaddress.ip_address(addr or "")
        except ValueError:
            return False
        return any(ip in net for net in networks)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if networks and is_trusted(request.remote):
            hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",")]
            for hop in reversed([h for h in hops if h]):
                if not is_trusted(hop):
                    return await handler(request.clone(remote=hop))
        return await handler(request)

    return middleware
