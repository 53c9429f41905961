"""Redis cache-aside for per-user derived data (task stats), never stale after a write.

Each user has a *generation* counter in Redis, bumped after every acknowledged write. A cached
value stores the generation it was computed at and is served only while that is still the
current one; a reader computes with the generation it read *before* computing, so a write that
races with the computation makes the stored value stale-on-arrival instead of stale-forever.
Redis failures fail open: reads compute from MongoDB, writes succeed (counted and logged). A
bump lost to an outage is repaired by the ``invalidate_cache`` actor that every task event
reaches through the outbox once Redis is back.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from prometheus_client import Counter
from pydantic import BaseModel
from redis.exceptions import RedisError

from config.logging import get_logger
from core.context import Context

log = get_logger(__name__)
M = TypeVar("M", bound=BaseModel)

CACHE_REQUESTS = Counter("cache_requests_total", "Cache lookups", ["cache", "result"])
CACHE_ERRORS = Counter("cache_errors_total", "Cache operations that failed open", ["op"])
TTL_SECONDS = 3600


def _keys(ctx: Context, name: str, user_id: str) -> tuple[str, str]:
    return ctx.key("gen", user_id), ctx.key("cache", name, user_id)


async def bump(ctx: Context, user_id: str) -> None:
    """Invalidate every cached value of ``user_id`` (call after each acknowledged write)."""
    try:
        await ctx.redis.incr(ctx.key("gen", user_id))
    except RedisError:
        CACHE_ERRORS.labels("bump").inc()
        log.warning("cache.bump_failed", user_id=user_id)


async def cached(
    ctx: Context,
    name: str,
    user_id: str,
    model: type[M],
    compute: Callable[[], Awaitable[tuple[M, float]]],
) -> tuple[M, bool]:
    """The cached value (``hit`` True) or a freshly computed and stored one.

    ``compute`` returns the value and the epoch second until which it holds even without
    writes (e.g. when the next task falls overdue).
    """
    gen_key, value_key = _keys(ctx, name, user_id)
    try:
        gen_raw, blob = await ctx.redis.mget(gen_key, value_key)
    except RedisError:
        CACHE_ERRORS.labels("get").inc()
        CACHE_REQUESTS.labels(name, "error").inc()
        return (await compute())[0], False
    gen = int(gen_raw or 0)
    if blob is not None:
        entry: dict[str, Any] = json.loads(blob)
        if entry.get("gen") == gen and time.time() < entry.get("until", 0):
            CACHE_REQUESTS.labels(name, "hit").inc()
            return model.model_validate(entry["value"]), True
    CACHE_REQUESTS.labels(name, "miss").inc()
    value, until = await compute()
    payload = json.dumps({"gen": gen, "until": until, "value": value.model_dump(mode="json")})
    ttl = max(1, min(TTL_SECONDS, math.ceil(until - time.time())))
    try:
        await ctx.redis.set(value_key, payload, ex=ttl)
    except RedisError:
        CACHE_ERRORS.labels("set").inc()
    return value, False
