"""Cache actors: repair invalidations lost to a Redis outage and warm the next reads."""

from __future__ import annotations

from redis.exceptions import RedisError

from core import cache, tasks
from workers.actors import DeclareOne, Event, bind_event
from workers.resources import WorkerResources

QUEUE = "cache"
#: One warm-up per user per burst of writes: later events within this window only bump.
WARM_DEBOUNCE_MS = 500


def declare(declare_one: DeclareOne, res: WorkerResources) -> None:
    """Declare this concern's actors."""

    async def refresh_user_cache(event: Event) -> None:
        """Invalidate the user's cached reads (again: the write's own bump may have been lost
        to a Redis outage) and precompute stats and the first page."""
        bind_event(event)
        ctx = await res.context()
        user_id = event["user_id"]
        if event.get("type", "").startswith("task."):
            await cache.bump(ctx, user_id)
        try:
            first = await ctx.redis.set(
                ctx.key("warm", user_id), b"1", nx=True, px=WARM_DEBOUNCE_MS
            )
        except RedisError:
            return  # Redis is away: nothing to warm into; the next read computes
        if first:
            await tasks.warm(ctx, user_id)

    declare_one(QUEUE, refresh_user_cache, max_retries=3)
