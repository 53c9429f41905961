"""The tracker on real Redis (core/tracking.py): it arms the in-process cache, relays the
pushes of the prefixes it registered and no others, and disarms at once when its connection is
killed, re-arming after; the lease script never lets callers exceed the limit together."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from core import ratelimit
from core.local_cache import LocalCache
from core.tracking import RespError, Tracker, _Incomplete, command, parse
from tests.conftest import eventually


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[tuple[aioredis.Redis, str]]:
    prefix = f"ttr{uuid.uuid4().hex[:10]}:"
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client, prefix
    finally:
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@pytest.fixture
async def tracked(
    redis_url: str, redis: tuple[aioredis.Redis, str]
) -> AsyncIterator[tuple[LocalCache, Tracker]]:
    _, prefix = redis
    cache = LocalCache(prefix)
    tracker = Tracker(
        redis_url, [prefix + "gen:", prefix + "deny:"], cache, name=prefix.rstrip(":")
    )
    tracker.start()
    await eventually(lambda: cache.armed, "the tracker armed the cache")
    try:
        yield cache, tracker
    finally:
        await tracker.stop()
    assert not cache.armed


async def test_pushes_name_changed_keys_of_the_registered_prefixes_only(
    redis: tuple[aioredis.Redis, str], tracked: tuple[LocalCache, Tracker]
) -> None:
    client, prefix = redis
    cache, _ = tracked
    seen: list[list[str] | None] = []
    original = cache.invalidate
    cache.invalidate = lambda keys: (seen.append(keys), original(keys))[1]  # type: ignore[method-assign]
    await client.set(prefix + "cache:stats:u1", b"x")  # not a tracked prefix
    await client.incr(prefix + "gen:u1")
    await client.set(prefix + "deny:jti:j1", b"1")
    await eventually(lambda: len(seen) >= 2, "two pushes")
    assert seen == [[prefix + "gen:u1"], [prefix + "deny:jti:j1"]]


async def test_a_killed_connection_disarms_then_the_tracker_comes_back(
    redis: tuple[aioredis.Redis, str], tracked: tuple[LocalCache, Tracker]
) -> None:
    client, prefix = redis
    cache, _ = tracked
    epoch = cache.epoch
    # The tracker's connection, by the name it gave itself.
    [mine] = [c for c in await client.client_list() if c.get("name") == prefix.rstrip(":")]
    assert "t" in mine["flags"] and mine["resp"] == "3"  # tracking on, RESP3
    await client.client_kill_filter(_id=mine["id"])
    await eventually(lambda: cache.epoch > epoch + 1 and cache.armed, "disarmed, then re-armed")


def test_resp3_parser_reads_what_the_tracker_receives() -> None:
    push = b">2\r\n$10\r\ninvalidate\r\n*2\r\n$3\r\nk:1\r\n$3\r\nk:2\r\n"
    assert parse(push) == (("push", [b"invalidate", [b"k:1", b"k:2"]]), len(push))
    assert parse(b">2\r\n$10\r\ninvalidate\r\n_\r\n")[0] == ("push", [b"invalidate", None])
    hello = b"%2\r\n+server\r\n+redis\r\n+modules\r\n*0\r\n"
    assert parse(hello)[0] == ["server", "redis", "modules", []]
    assert parse(b"+OK\r\n:5\r\n", 5) == (5, 9)
    assert isinstance(parse(b"-ERR nope\r\n")[0], RespError)
    with pytest.raises(_Incomplete):
        parse(push[:-3])
    with pytest.raises(RespError):
        parse(b"?what\r\n")
    assert command("PING") == b"*1\r\n$4\r\nPING\r\n"


async def test_leases_of_two_processes_never_exceed_the_limit_together(
    redis: tuple[aioredis.Redis, str],
) -> None:
    """Two processes' leases against one bucket of 20 per minute: exactly 20 allowed, however
    the requests are split and whatever is given back."""
    client, prefix = redis
    key, policy = prefix + "ratelimit:user:u1", ratelimit.Policy(20, 60)

    async def take(ask: int, give_back: int = 0) -> list[int]:
        raw = await client.eval(
            ratelimit.GCRA_BODY, 1, key, policy.limit, policy.window, ask, give_back
        )
        return [int(v) for v in raw]

    a, b = await take(5), await take(8)
    assert (a[0], a[3], b[0], b[3]) == (1, 5, 1, 8)
    assert b[1] == 7  # remaining in the shared bucket
    c = await take(10)
    assert (c[0], c[3], c[1]) == (1, 7, 0)  # only what was left
    refused = await take(1)
    assert refused[0] == 0 and refused[3] == 0 and 1 <= refused[2] <= 3000
    given = await take(2, give_back=3)  # 3 unspent came back: 2 of them taken again
    assert (given[0], given[3], given[1]) == (1, 2, 1)
    granted = a[3] + b[3] + c[3] - 3 + given[3]
    assert granted == 19 and (await take(5))[3] == 1  # one left: exactly the limit in all
    assert (await take(1))[0] == 0
    await asyncio.sleep(0)
