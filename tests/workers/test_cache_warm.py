"""The cache actor's warm-ups are paced by what they cost (workers/cache.py, WarmPacer)."""

from __future__ import annotations

from typing import Any

from bson import ObjectId

from core import cache, tasks
from core.context import Context
from core.events import EventType, new_event, payload
from core.store import utcnow
from workers import cache as cache_actor


def test_the_window_is_the_debounce_or_twenty_times_the_last_warm_up_capped() -> None:
    pacer = cache_actor.WarmPacer(limit=2)
    assert pacer.window_ms("a") == cache_actor.WARM_DEBOUNCE_MS
    pacer.took("a", 0.01)  # cheap: the debounce
    assert pacer.window_ms("a") == 500
    pacer.took("a", 0.2)
    assert pacer.window_ms("a") == 4_000
    pacer.took("b", 60.0)
    assert pacer.window_ms("b") == cache_actor.WARM_MAX_WINDOW_MS
    pacer.took("c", 0.3)  # over the limit: the oldest remembered (a) is forgotten
    assert pacer.window_ms("a") == 500 and pacer.window_ms("c") == 6_000
    pacer.took("b", 0.1)  # remembered again: b is now the newest, c the oldest
    pacer.took("a", 0.1)
    assert pacer.window_ms("c") == 500 and pacer.window_ms("b") == 2_000


async def _cached(ctx: Context, user: str, name: str) -> bool:
    """Whether ``name`` is cached for ``user``'s current generation."""
    gen, blob = await ctx.redis.mget(ctx.key("gen", user), ctx.key("cache", name, user))
    return blob is not None and cache._current(blob.partition(b"\n")[0], int(gen or 0))


async def test_the_warm_window_is_paced_by_what_the_warm_up_took(ctx: Context) -> None:
    user = str(ObjectId())
    now = utcnow()
    docs: list[dict[str, Any]] = [
        {
            "owner": user,
            "title": f"t{i}",
            "status": "todo",
            "priority": "medium",
            "tags": [],
            "description": "",
            "created_at": now,
            "updated_at": now,
            "version": 1,
        }
        for i in range(300)
    ]
    await ctx.store["tasks"].insert_many(docs)

    def event() -> Any:
        doc = new_event(EventType.TASK_CREATED, user_id=user, subject_id="t", data={"task": {}})
        return payload(doc)

    await cache_actor.refresh_user_cache(ctx, event())  # type: ignore[arg-type]
    assert await _cached(ctx, user, tasks.STATS_CACHE)
    assert await _cached(ctx, user, tasks.FIRST_PAGE_CACHE)
    took = cache_actor.PACER._took[user]
    window = await ctx.redis.pttl(ctx.key("warm", user))
    assert window > 0 and abs(window - cache_actor.PACER.window_ms(user)) < 200
    assert cache_actor.PACER.window_ms(user) == max(500, min(10_000, int(20_000 * took)))
    # A write within the window: invalidated, not warmed again (a reader computes).
    await cache_actor.refresh_user_cache(ctx, event())  # type: ignore[arg-type]
    assert not await _cached(ctx, user, tasks.STATS_CACHE)
    # The window over: the next write warms again.
    await ctx.redis.delete(ctx.key("warm", user))
    await cache_actor.refresh_user_cache(ctx, event())  # type: ignore[arg-type]
    assert await _cached(ctx, user, tasks.STATS_CACHE)
