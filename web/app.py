"""The application factory: ``create_app(settings)`` builds everything, tests call it too."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import gc
import importlib.util
import os
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import aiohttp_cors
from aiohttp import web
from aiohttp.typedefs import Middleware
from pydantic import SecretStr

from config.connections import Connections
from config.logging import get_logger
from config.settings import Settings
from core import accounts, cancel
from core.context import Context, open_context
from core.errors import Invalid
from core.local_cache import LocalCache
from core.tracking import Tracker
from web.handlers import dashboard
from web.handlers.probes import READINESS, Readiness
from web.keys import CONNECTIONS, CONTEXT, OPENAPI, PLATFORM, RELAY, RELAY_WAKE, SETTINGS
from web.middlewares import real_client, request_context, security_headers
from web.openapi import build_openapi
from web.outages import OUTAGES, Outages
from web.routes import ROUTES
from web.routing import add_routes, refuse_other_methods
from workers.broker import Platform, build_broker
from workers.relay import Relay

log = get_logger(__name__)


def create_app(
    settings: Settings,
    *,
    connections: Connections | None = None,
    platform: Platform | None = None,
    relay: bool = True,
) -> web.Application:
    """Build the aiohttp application.

    ``connections`` and ``platform`` are shared with in-process workers by ``taskmanager run``;
    ``relay=False`` leaves the outbox to another process.
    """
    chain: list[Middleware] = [request_context]
    if settings.trusted_proxies:
        chain.insert(0, real_client(settings.trusted_proxies))
    app = web.Application(middlewares=chain, client_max_size=settings.max_body_size)
    app[SETTINGS] = settings
    app[CONNECTIONS] = connections or Connections(settings)
    app[PLATFORM] = platform or build_broker(app[CONNECTIONS])
    if platform is None:
        app.on_cleanup.append(_close_platform)
    # Built on the first GET /openapi.json, not at start-up: generating the models' JSON
    # schemas left 3.5 MB in every web process (measured building the app) that most never
    # serve the document.
    app[OPENAPI] = _openapi_document
    app[RELAY_WAKE] = asyncio.Event()
    app[READINESS] = Readiness()
    app[DRAINING] = Draining()

    async def ping_mongodb() -> None:
        await app[CONTEXT].store.ping()

    async def ping_redis() -> None:
        await app[CONTEXT].redis.ping()

    app[OUTAGES] = Outages(ping_mongodb, ping_redis)
    app.on_shutdown.append(_stop_probes)
    app.on_response_prepare.append(_prepare)

    add_routes(app.router, ROUTES)
    app.router.add_static("/docs/static", _swagger_ui_static())
    app.router.add_static(dashboard.STATIC_PREFIX, dashboard.STATIC_DIR)
    if settings.cors_origins:
        _setup_cors(app, settings.cors_origins)
    refuse_other_methods(app.router)  # last: see its docstring

    app.cleanup_ctx.append(_context)
    if relay:
        app.cleanup_ctx.append(_relay)
    return app


def _swagger_ui_static() -> str:
    """The folder of Swagger UI's files (``/docs``), found without importing swagger-ui-py,
    which would load 44 modules (2.4 MB in every web process) for this one path."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the swagger-ui-py package (the /docs page's files) is missing")
    return os.path.join(next(iter(spec.submodule_search_locations)), "static")


async def _stop_probes(app: web.Application) -> None:
    await app[OUTAGES].close()


async def _close_platform(app: web.Application) -> None:
    await asyncio.to_thread(app[PLATFORM].close)


async def _context(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    async with open_context(settings, app[CONNECTIONS]) as ctx:
        await ctx.store.ensure_indexes()
        if settings.admin_email and settings.admin_password:
            await _bootstrap_admin(ctx, settings.admin_email, settings.admin_password)
        app[CONTEXT] = ctx
        tracker = _tracker(ctx)
        try:
            yield
        finally:
            if tracker is not None:
                await tracker.stop()


def _tracker(ctx: Context) -> Tracker | None:
    """Start the in-process cache and its Redis tracker (``LOCAL_CACHE``, real Redis only)."""
    settings = ctx.settings
    if not settings.local_cache or settings.redis_url is None:
        return None
    ctx.local = LocalCache(settings.redis_prefix)
    tracker = Tracker(settings.redis_url, [ctx.key("gen", ""), ctx.key("deny", "")], ctx.local)
    tracker.start()
    return tracker


async def _bootstrap_admin(ctx: Context, email: str, password: SecretStr) -> None:
    """``ADMIN_EMAIL``/``ADMIN_PASSWORD``: create that admin if no account has the email.

    It never promotes an account whose password it did not set: when a non-admin account
    already has the email (someone registered it first), it logs a warning and changes
    nothing, and the start carries on (refusing to start would let anyone who registers the
    address stop the deployment). ``taskmanager admin create --promote-existing`` is the
    deliberate way to take such an account over. A bad email or password stops the start.
    """
    try:
        user, outcome = await accounts.ensure_admin(ctx, email, password.get_secret_value())
    except Invalid as exc:
        problems = "; ".join(f"{e.field}: {e.message}" for e in exc.errors)
        raise RuntimeError(f"ADMIN_EMAIL/ADMIN_PASSWORD refused: {problems}") from exc
    if outcome == "exists" and user.get("role") != "admin":
        log.warning(
            "admin.bootstrap_not_promoted",
            email=user["email"],
            user_id=str(user["_id"]),
            reason="a non-admin account has ADMIN_EMAIL; it was not promoted (use "
            "`taskmanager admin create --promote-existing` to take it over)",
        )
        return
    log.info("admin.ensured", email=user["email"], outcome=outcome)


async def _relay(app: web.Application) -> AsyncIterator[None]:
    relay = Relay(app[CONTEXT], app[PLATFORM].broker)
    relay.wake = app[RELAY_WAKE]
    app[RELAY] = relay
    task = asyncio.create_task(relay.run(), name="outbox-relay")
    yield
    await cancel.stop(task, 10)


def _setup_cors(app: web.Application, origins: list[str]) -> None:
    options = aiohttp_cors.ResourceOptions(
        allow_credentials=False,
        expose_headers=(
            "X-Request-ID",
            "ETag",
            "Location",
            "RateLimit",
            "RateLimit-Policy",
            "Retry-After",
            "Idempotent-Replayed",
        ),
        allow_headers=(
            "Authorization",
            "Content-Type",
            "If-Match",
            "If-None-Match",
            "Idempotency-Key",
            "X-Request-ID",
        ),
        max_age=3600,
    )
    cors = aiohttp_cors.setup(app, defaults={origin: options for origin in origins})
    for route in list(app.router.routes()):
        cors.add(route)


#: After SIGTERM (or SIGINT): how long connections already open are still served (each answer
#: then says ``Connection: close``) before the idle ones are closed, and how long requests
#: under way may take to finish after that.
DRAIN_SECONDS = 2.0
SHUTDOWN_TIMEOUT = 15.0
DRAIN_POLL = 0.05


@dataclass
class Draining:
    """Whether the process is shutting down (set by :func:`serve`)."""

    active: bool = False


DRAINING = web.AppKey("draining", Draining)


async def _prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer carries the security headers (web/middlewares.py). Once shutdown began,
    every answer closes its connection, so the client sends its next request elsewhere instead
    of on a connection about to be closed. (One callback: each is a layer per answer.)"""
    security_headers(response)
    if request.app[DRAINING].active:
        response.force_close()
        response.headers["Connection"] = "close"


#: aiohttp's HTTP parser refuses a request line over 8,190 bytes with a bare ``text/plain`` 400
#: before any middleware runs. With more room, a long query string reaches the app, whose query
#: models bound every field and answer a precise 422 problem; headers keep aiohttp's limit.
MAX_LINE_SIZE = 65536


def _build_openapi() -> dict[str, Any]:
    return build_openapi(ROUTES, version=version("taskmanager"))


#: The OpenAPI document, built once per process on the first ask (it depends on the routes
#: alone, so every app of the process shares it).
_openapi_document: Callable[[], dict[str, Any]] = functools.cache(_build_openapi)


def serve(app: web.Application, *, host: str, port: int, reuse_port: bool = False) -> None:
    """Serve ``app`` until SIGTERM or SIGINT, then shut down without dropping a request.

    aiohttp's own ``run_app`` closes idle keep-alive connections at once on SIGTERM, racing
    requests the clients are sending on them ("server disconnected": was the POST applied?).
    Here shutdown is: stop accepting connections; for :data:`DRAIN_SECONDS` keep answering
    what arrives on the open ones, each answer with ``Connection: close`` (a client then opens
    a new connection, which is refused: clearly never sent); then close the idle connections,
    let requests under way finish (at most :data:`SHUTDOWN_TIMEOUT`) and run the clean-ups.

    ``reuse_port``: bind with ``SO_REUSEPORT``, so that the processes of one
    ``taskmanager web --processes N`` listen on the same port (the kernel spreads new
    connections over them); each drains on its own as above.
    """
    _return_large_buffers()
    asyncio.run(_serve(app, host, port, reuse_port=reuse_port))


def _return_large_buffers() -> None:
    """Serve every allocation of 1 MiB or more from its own mapping, returned to the OS when
    freed (glibc's ``M_MMAP_THRESHOLD``, as ``MALLOC_MMAP_THRESHOLD_=1048576`` in the Docker
    image, which this overrides). Without it glibc raises the threshold after the first
    sign-in and argon2id's 19 MiB buffers stay in the heap: measured here, a web process after
    six sign-ups held 130 MB instead of 111. A no-op off glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


#: glibc's mallopt parameter number of the mmap threshold.
M_MMAP_THRESHOLD = -3


async def _serve(app: web.Application, host: str, port: int, *, reuse_port: bool = False) -> None:
    runner = web.AppRunner(
        app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT, max_line_size=MAX_LINE_SIZE
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Before start-up, as aiohttp does: a signal while starting stops right after.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
        await site.start()
        # What start-up allocated (modules, the app, the clients) lives as long as the process:
        # out of the cyclic collector's sight, its full collections stop walking it.
        gc.freeze()
        await stop.wait()
        app[DRAINING].active = True
        await site.stop()
        server = runner.server
        log.info(
            "web.draining",
            connections=len(server.connections) if server else 0,
            seconds=DRAIN_SECONDS,
        )
        for _ in range(round(DRAIN_SECONDS / DRAIN_POLL)):
            if server is None or not server.connections:
                break  # every client has gone: no need to wait any longer
            await asyncio.sleep(DRAIN_POLL)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
        log.info("web.stopped")
