"""The application factory: ``create_app(settings)`` builds everything, tests call it too."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from importlib.metadata import version

import aiohttp_cors
import swagger_ui
from aiohttp import web

from config.connections import Connections
from config.logging import get_logger
from config.settings import Settings
from core import accounts
from core.context import open_context
from web.handlers import dashboard
from web.keys import CONNECTIONS, CONTEXT, OPENAPI, PLATFORM, RELAY, RELAY_WAKE, SETTINGS
from web.middlewares import problems, real_client, request_context
from web.openapi import build_openapi
from web.routes import ROUTES
from web.routing import wrap
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
    app = web.Application(
        middlewares=[real_client(settings.trusted_proxies), request_context, problems],
        client_max_size=settings.max_body_size,
    )
    app[SETTINGS] = settings
    app[CONNECTIONS] = connections or Connections(settings)
    app[PLATFORM] = platform or build_broker(app[CONNECTIONS])
    if platform is None:
        app.on_cleanup.append(_close_platform)
    app[OPENAPI] = build_openapi(ROUTES, version=version("taskmanager"))
    app[RELAY_WAKE] = asyncio.Event()

    for route in ROUTES:
        app.router.add_route(route.method, route.path, wrap(route), name=route.operation_id)
    app.router.add_static(
        "/docs/static", os.path.join(os.path.dirname(swagger_ui.__file__), "static")
    )
    app.router.add_static(dashboard.STATIC_PREFIX, dashboard.STATIC_DIR)
    if settings.cors_origins:
        _setup_cors(app, settings.cors_origins)

    app.cleanup_ctx.append(_context)
    if relay:
        app.cleanup_ctx.append(_relay)
    return app


async def _close_platform(app: web.Application) -> None:
    await asyncio.to_thread(app[PLATFORM].close)


async def _context(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    async with open_context(settings, app[CONNECTIONS]) as ctx:
        await ctx.store.ensure_indexes()
        if settings.admin_email and settings.admin_password:
            _, created = await accounts.ensure_admin(
                ctx, settings.admin_email, settings.admin_password.get_secret_value()
            )
            log.info("admin.ensured", email=settings.admin_email, created=created)
        app[CONTEXT] = ctx
        yield


async def _relay(app: web.Application) -> AsyncIterator[None]:
    relay = Relay(app[CONTEXT], app[PLATFORM].broker)
    relay.wake = app[RELAY_WAKE]
    app[RELAY] = relay
    task = asyncio.create_task(relay.run(), name="outbox-relay")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, TimeoutError):
        await asyncio.wait_for(task, 10)


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
