"""Cache actor: repairs invalidations lost to a Redis outage and warms the next reads."""

from __future__ import annotations

import time

from redis.exceptions import RedisError

from core import cache, tasks
from core.events import TaskEvent, UserEvent
from workers.actors import ActorContext

QUEUE = "cache"
#: One warm-up per user per burst of writes: later events within this window only bump.
WARM_DEBOUNCE_MS = 500
#: A warm-up that took ``t`` opens a window of at least this many times ``t``, at most
#: :data:`WARM_MAX_WINDOW_MS` (see :class:`WarmPacer`).
WARM_COST_FACTOR = 20
WARM_MAX_WINDOW_MS = 10_000


class WarmPacer:
    """How long a user's warm-up window lasts: :data:`WARM_DEBOUNCE_MS`, or
    :data:`WARM_COST_FACTOR` times what this process's last warm-up for the user took.

    The stats read every task of the user (829 ms for 10,000 on the SecantusDB test server),
    and while the user keeps writing each warm-up is stale at their next write: with a fixed
    window, one user writing steadily with thousands of tasks kept the store busy warming
    what nobody read in between (an aggregation every 0.5 s). Paced by its cost, warming takes
    at most a twentieth of the store's time per busy user; a reader in a longer window computes
    on its cache miss, as without a warm-up. Per process (each worker paces what it runs), at
    most :attr:`limit` users remembered, the oldest forgotten first.
    """

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self._took: dict[str, float] = {}

    def window_ms(self, user_id: str) -> int:
        """The window to open for ``user_id``'s next warm-up (ms)."""
        cost = int(WARM_COST_FACTOR * 1000 * self._took.get(user_id, 0.0))
        return min(WARM_MAX_WINDOW_MS, max(WARM_DEBOUNCE_MS, cost))

    def took(self, user_id: str, seconds: float) -> None:
        """Remember how long ``user_id``'s warm-up took."""
        self._took.pop(user_id, None)
        self._took[user_id] = seconds
        if len(self._took) > self.limit:
            del self._took[next(iter(self._took))]


PACER = WarmPacer()


async def refresh_user_cache(ctx: ActorContext, event: UserEvent | TaskEvent) -> None:
    """Invalidate the user's cached reads after a task event (again: the write's own bump may
    have been lost to a Redis outage) and precompute stats and the first page, at most once
    per window (:class:`WarmPacer`)."""
    user = event.user_id
    if isinstance(event, TaskEvent):
        await cache.bump(ctx, user)
    try:
        first = await ctx.redis.set(ctx.key("warm", user), b"1", nx=True, px=PACER.window_ms(user))
    except RedisError:
        return  # Redis is away: nothing to warm into; the next read computes
    if first:
        began = time.monotonic()
        await tasks.warm(ctx, user)
        PACER.took(user, time.monotonic() - began)
