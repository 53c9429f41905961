"""Connection factories: MongoDB (PyMongo's native async client) and Redis.

With no ``REDIS_URL`` the factories hand out fakeredis clients over one in-process
:class:`fakeredis.FakeServer` (the all-in-one default): async for the web and actors, sync for
the Dramatiq broker, all seeing the same data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import redis as redis_sync_lib
import redis.asyncio as aioredis
from pymongo import AsyncMongoClient

from config.settings import Settings

if TYPE_CHECKING:  # imported lazily: fakeredis pulls in ~13 MB a real deployment never needs
    import fakeredis

MongoClient = AsyncMongoClient[dict[str, Any]]


class Connections:
    """Builds clients from settings. One per process; clients are per event loop."""

    def __init__(self, settings: Settings, fake_server: fakeredis.FakeServer | None = None):
        self.settings = settings
        self.fake_server = fake_server
        if settings.redis_url is None and fake_server is None:
            import fakeredis

            self.fake_server = fakeredis.FakeServer()

    @property
    def redis_is_fake(self) -> bool:
        """Whether Redis is the in-process stand-in."""
        return self.settings.redis_url is None

    def mongo(self) -> MongoClient:
        """A new async MongoDB client (create it on the event loop that will use it)."""
        s = self.settings
        if s.mongodb_url is None:
            raise RuntimeError("MONGODB_URL is not set")
        return AsyncMongoClient(
            s.mongodb_url,
            maxPoolSize=s.mongodb_max_pool_size,
            minPoolSize=s.mongodb_min_pool_size,
            serverSelectionTimeoutMS=s.mongodb_timeout_ms,
            connectTimeoutMS=s.mongodb_timeout_ms,
            tz_aware=True,
            appname="taskmanager",
        )

    def redis(self) -> aioredis.Redis:
        """A new asyncio Redis client (decoded responses are off: callers decode)."""
        if self.settings.redis_url is None:
            import fakeredis

            return fakeredis.FakeAsyncRedis(server=self.fake_server)
        return aioredis.Redis.from_url(
            self.settings.redis_url,
            socket_connect_timeout=2,
            socket_timeout=2,
            health_check_interval=30,
        )

    def redis_sync(self) -> redis_sync_lib.Redis:
        """A synchronous Redis client (for the Dramatiq broker and CLI)."""
        if self.settings.redis_url is None:
            import fakeredis

            return fakeredis.FakeRedis(server=self.fake_server)
        return redis_sync_lib.Redis.from_url(self.settings.redis_url, socket_connect_timeout=2)
