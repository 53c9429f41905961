"""Every MongoDB and Redis client of the platform is built here, with the timeouts below.

:class:`Connections` is the one factory a process holds: PyMongo's native async client, asyncio
Redis clients (web, actors, scheduler) and synchronous ones (the Dramatiq broker, the worker
heartbeat and registry, queue administration, the CLI). No other module of the platform calls
a client constructor, so how long anything may wait on a store is decided in this file:

- MongoDB: ``MONGODB_TIMEOUT_MS`` for server selection and for connecting;
- Redis: :data:`REDIS_CONNECT_TIMEOUT` to connect; :data:`REDIS_TIMEOUT` per command on the
  asyncio clients (a hung Redis becomes a fast 503 or a fail-open decision, never a stalled
  request); :data:`REDIS_SYNC_TIMEOUT` per command on the synchronous ones (the broker's Lua
  scripts and the queue inspector walk whole queues);
- :data:`CLOSE_TIMEOUT` to close a client at shutdown.

With no ``REDIS_URL`` the factory hands out fakeredis clients over one in-process
:class:`fakeredis.FakeServer` (the all-in-one default): async for the web and actors, sync for
the broker, all seeing the same data.
"""

from __future__ import annotations

import linecache
from typing import TYPE_CHECKING, Any

import redis as redis_sync_lib
import redis.asyncio as aioredis
from pymongo import AsyncMongoClient

from config.settings import Settings

if TYPE_CHECKING:  # imported lazily: fakeredis pulls in ~13 MB a real deployment never needs
    import fakeredis

MongoClient = AsyncMongoClient[dict[str, Any]]

#: Seconds to open a connection to Redis.
REDIS_CONNECT_TIMEOUT = 2.0
#: Seconds an asyncio Redis client waits for the answer to one command.
REDIS_TIMEOUT = 2.0
#: Seconds a synchronous Redis client waits for the answer to one command.
REDIS_SYNC_TIMEOUT = 5.0
#: Seconds a pooled Redis connection may sit idle before it is checked (PING) on reuse.
REDIS_HEALTH_CHECK_INTERVAL = 30
#: Seconds allowed to find out whether a Redis server answers at all (``cli.embedded``).
REDIS_PROBE_TIMEOUT = 0.5
#: Seconds allowed to close each client at shutdown.
CLOSE_TIMEOUT = 10.0


def sync_redis(url: str, *, timeout: float = REDIS_SYNC_TIMEOUT) -> redis_sync_lib.Redis:
    """A synchronous client of ``url`` that fails a call after ``timeout`` seconds instead of
    blocking forever on a Redis that stopped answering."""
    return redis_sync_lib.Redis.from_url(
        url,
        socket_connect_timeout=min(REDIS_CONNECT_TIMEOUT, timeout),
        socket_timeout=timeout,
        health_check_interval=REDIS_HEALTH_CHECK_INTERVAL,
    )


class Connections:
    """Builds clients from settings. One per process; asyncio clients are per event loop."""

    def __init__(self, settings: Settings, fake_server: fakeredis.FakeServer | None = None):
        self.settings = settings
        self.fake_server = fake_server
        if settings.redis_url is None and fake_server is None:
            import fakeredis

            self.fake_server = fakeredis.FakeServer()

    def mongo(self) -> MongoClient:
        """A new async MongoDB client (create it on the event loop that will use it)."""
        s = self.settings
        if s.mongodb_url is None:
            raise RuntimeError("MONGODB_URL is not set")
        client: MongoClient = AsyncMongoClient(
            s.mongodb_url,
            maxPoolSize=s.mongodb_max_pool_size,
            minPoolSize=s.mongodb_min_pool_size,
            serverSelectionTimeoutMS=s.mongodb_timeout_ms,
            connectTimeoutMS=s.mongodb_timeout_ms,
            tz_aware=True,
            appname="taskmanager",
        )
        # PyMongo keeps the stack that created a client (to name it in a warning after a fork):
        # formatting it read every source file on the stack into linecache, 1.1 MB in a web
        # process (mongo_client.py and click's core.py alone are 290 KB of text). Those files
        # are dropped from the cache (a traceback printed later reads what it needs again);
        # sources registered without a file ("<attrs generated ...>") stay.
        for name in [n for n in linecache.cache if not n.startswith("<")]:
            linecache.cache.pop(name, None)
        return client

    def redis(self) -> aioredis.Redis:
        """A new asyncio client of ``REDIS_URL`` (decoded responses are off: callers decode)."""
        if self.settings.redis_url is None:
            import fakeredis

            return fakeredis.FakeAsyncRedis(server=self.fake_server)
        return aioredis.Redis.from_url(
            self.settings.redis_url,
            socket_connect_timeout=REDIS_CONNECT_TIMEOUT,
            socket_timeout=REDIS_TIMEOUT,
            health_check_interval=REDIS_HEALTH_CHECK_INTERVAL,
        )

    def redis_sync(self) -> redis_sync_lib.Redis:
        """A new synchronous client of ``REDIS_URL`` (worker registry, dead-letter notes, CLI)."""
        return self._sync(self.settings.redis_url)

    def broker_redis(self) -> redis_sync_lib.Redis:
        """A new synchronous client of the Redis broker (``BROKER_URL``, else ``REDIS_URL``);
        for a RabbitMQ ``BROKER_URL`` use :meth:`redis_sync`."""
        return self._sync(self.settings.effective_broker_url)

    def _sync(self, url: str | None) -> redis_sync_lib.Redis:
        if url is None:
            import fakeredis

            return fakeredis.FakeRedis(server=self.fake_server)
        return sync_redis(url)
