"""Answering while MongoDB or Redis cannot be reached: 503, fast, one log line per outage.

A request that fails because a store is unreachable (PyMongo's ``ConnectionFailure`` family:
``ServerSelectionTimeoutError``, ``AutoReconnect``, ``NetworkTimeout``...; redis-py's
``ConnectionError`` / ``TimeoutError``) is answered ``503`` problem+json with
``Retry-After: RETRY_AFTER``, never 500 with a traceback (``web.middlewares.problems`` asks
:meth:`Outages.failed`).

The first failure marks the store down: one ``dependency.unavailable`` error line is logged
(no traceback; with Sentry, one event per outage) and a background probe pings the store every
:data:`PROBE_EVERY` seconds. While MongoDB is down every ``/api/v1`` operation (the document
excepted) is answered 503 at once, without waiting ``MONGODB_TIMEOUT_MS`` for a server: nearly
all of them read or write it. Only the requests already under way when the outage began wait
for that timeout. A Redis outage is not short-circuited (the rate limit and caches fail open,
most routes still work); the requests that cannot do without Redis answer 503. When the probe
succeeds one ``dependency.recovered`` line is logged and requests flow again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from pymongo.errors import ConnectionFailure
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from config.logging import get_logger
from core import cancel
from core.errors import Unavailable

log = get_logger(__name__)

#: Seconds a client is told to wait (``Retry-After``) while a store is unreachable.
RETRY_AFTER = 2
#: How often the background probe pings a store marked down, and how long each ping may take.
PROBE_EVERY = 0.5
PROBE_TIMEOUT = 1.0
#: Paths under this prefix need MongoDB (refused at once while it is down), except these.
API_PREFIX = "/api/v1/"
NEEDS_NO_STORE = frozenset({"/api/v1/openapi.json"})

Probe = Callable[[], Awaitable[object]]


class Dependency:
    """One store's state: up, or down since a moment with a probe watching for its return."""

    def __init__(self, name: str, probe: Probe, errors: tuple[type[BaseException], ...]):
        self.name = name
        self.probe = probe
        self.errors = errors
        self.down_since: float | None = None
        self.refused = 0
        self._watch: asyncio.Task[None] | None = None

    @property
    def down(self) -> bool:
        """Whether the store is marked unreachable."""
        return self.down_since is not None

    def answer(self) -> Unavailable:
        """The 503 to send while it is down."""
        self.refused += 1
        return Unavailable(
            f"The {self.name} store is unreachable; retry in {RETRY_AFTER} s",
            headers={"Retry-After": str(RETRY_AFTER)},
        )

    def failed(self, exc: BaseException) -> Unavailable:
        """A request failed on this store: mark it down (logging once) and answer 503."""
        if self.down_since is None:
            self.down_since, self.refused = time.monotonic(), 0
            log.error(
                "dependency.unavailable",
                dependency=self.name,
                error=type(exc).__name__,
                retry_after=RETRY_AFTER,
            )
            self._watch = asyncio.create_task(self._until_back(), name=f"probe-{self.name}")
        return self.answer()

    async def _answers(self) -> bool:
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the cancellation
            # close() sends as a ping completes, and this loop would never end while down.
            async with asyncio.timeout(PROBE_TIMEOUT):
                await self.probe()
        except Exception:  # still unreachable, whatever the client raises
            return False
        return True

    async def _until_back(self) -> None:
        answered = False
        while not answered:
            await cancel.pause(PROBE_EVERY)
            answered = await self._answers()
        since, self.down_since, self._watch = self.down_since or time.monotonic(), None, None
        log.info(
            "dependency.recovered",
            dependency=self.name,
            seconds=round(time.monotonic() - since, 1),
            refused=self.refused,
        )

    async def close(self) -> None:
        """Stop the probe (application clean-up)."""
        task, self._watch = self._watch, None
        if task is not None:
            await cancel.stop(task, 5)


class Outages:
    """The stores of one application (see the module docstring)."""

    def __init__(self, mongodb: Probe, redis: Probe):
        self.mongodb = Dependency("MongoDB", mongodb, (ConnectionFailure,))
        self.redis = Dependency("Redis", redis, (RedisConnectionError, RedisTimeoutError))

    def refusal(self, request: web.Request) -> Unavailable | None:
        """The 503 for a request that cannot succeed now (MongoDB down), else None."""
        if (
            self.mongodb.down
            and request.path.startswith(API_PREFIX)
            and request.path not in NEEDS_NO_STORE
        ):
            return self.mongodb.answer()
        return None

    def failed(self, exc: BaseException) -> Unavailable | None:
        """The 503 for an error meaning a store is unreachable (also when it is the
        ``__cause__`` of another error), after noting the outage; None for any other error."""
        seen: BaseException | None = exc
        for _ in range(5):
            if seen is None:
                break
            for dependency in (self.mongodb, self.redis):
                if isinstance(seen, dependency.errors):
                    return dependency.failed(seen)
            seen = seen.__cause__
        return None

    async def close(self) -> None:
        """Stop the probes."""
        await self.mongodb.close()
        await self.redis.close()


OUTAGES = web.AppKey("outages", Outages)
