"""Typed application and request keys (aiohttp's ``AppKey``): no module-level state."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from config.connections import Connections
from config.settings import Settings
from core.context import Context
from core.security import TokenClaims
from workers.broker import Platform
from workers.relay import Relay

SETTINGS = web.AppKey("settings", Settings)
CONNECTIONS = web.AppKey("connections", Connections)
CONTEXT = web.AppKey("context", Context)
#: The OpenAPI document, built on the first ask (``web/app.py``).
OPENAPI: web.AppKey[Callable[[], dict[str, Any]]] = web.AppKey("openapi")
#: Wakes the outbox relay right after a write, so events leave without waiting for a poll.
RELAY_WAKE = web.AppKey("relay_wake", asyncio.Event)

PLATFORM = web.AppKey("platform", Platform)
RELAY = web.AppKey("relay", Relay)

# Request-scoped values (set by the route wrapper).
REQ_CLAIMS = web.RequestKey("claims", TokenClaims)
REQ_BODY = web.RequestKey("body", BaseModel)
REQ_QUERY = web.RequestKey("query", BaseModel)
REQ_ID = web.RequestKey("request_id", str)
