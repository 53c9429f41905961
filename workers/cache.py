"""Cache actor: repairs invalidations lost to a Redis outage and warms the next reads."""

from __future__ import annotations

from redis.exceptions import RedisError

from core import cache, tasks
from core.events import TaskEvent, UserEvent
from workers.actors import ActorContext

QUEUE = "cache"
#: One warm-up per user per burst of writes: later events within this window only bump.
WARM_DEBOUNCE_MS = 500


async def refresh_user_cache(ctx: ActorContext, event: UserEvent | TaskEvent) -> None:
    """Invalidate the user's cached reads after a task event (again: the write's own bump may
    have been lost to a Redis outage) and precompute stats and the first page."""
    if isinstance(event, TaskEvent):
        await cache.bump(ctx, event.user_id)
    try:
        first = await ctx.redis.set(
            ctx.key("warm", event.user_id), b"1", nx=True, px=WARM_DEBOUNCE_MS
        )
    except RedisError:
        return  # Redis is away: nothing to warm into; the next read computes
    if first:
        await tasks.warm(ctx, event.user_id)
