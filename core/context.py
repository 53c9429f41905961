"""What domain functions are handed: the store, Redis, settings and the token service.

``core`` never builds connections itself; each process builds one :class:`Context` from its
:class:`~config.settings.Settings` and passes it down.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from config.connections import CLOSE_TIMEOUT, Connections
from config.settings import Settings
from core.local_cache import LocalCache
from core.security import Tokens
from core.store import Store


@dataclass
class Context:
    """Handles shared by domain code in one event loop."""

    settings: Settings
    store: Store
    redis: aioredis.Redis
    tokens: Tokens = field(init=False)
    #: The web process's in-process cache (core/local_cache.py); None elsewhere.
    local: LocalCache | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.tokens = Tokens(self.settings)

    def key(self, *parts: str) -> str:
        """A Redis key under this deployment's prefix."""
        return self.settings.redis_prefix + ":".join(parts)


@asynccontextmanager
async def open_context(settings: Settings, connections: Connections) -> AsyncIterator[Context]:
    """A :class:`Context` with fresh clients on the running loop, closed on exit."""
    store = Store(connections.mongo(), settings.mongodb_db)
    redis = connections.redis()
    try:
        yield Context(settings, store, redis)
    finally:
        # Bounded: shutting down must never hang on a server that stopped answering.
        for close in (store.client.close, redis.aclose):
            with suppress(TimeoutError):
                await asyncio.wait_for(close(), CLOSE_TIMEOUT)
