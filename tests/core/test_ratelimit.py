"""The GCRA limiter's Lua script, on real Redis and on fakeredis (the all-in-one stand-in)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis

from cli.embedded import free_port
from config.settings import Settings
from core import ratelimit
from core.ratelimit import Decision, Policy, _OutageLog


@pytest.fixture(params=["fakeredis", "redis"])
async def backend(request: Any, redis_url: str) -> AsyncIterator[tuple[aioredis.Redis, str]]:
    """A Redis client and a key prefix of this test's own (real keys are deleted after)."""
    prefix = f"trl{uuid.uuid4().hex[:10]}:"
    client: aioredis.Redis
    if request.param == "fakeredis":
        client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    else:
        client = aioredis.Redis.from_url(redis_url)
    try:
        yield client, prefix
    finally:
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def spend(redis: aioredis.Redis, key: str, policy: Policy, n: int) -> list[Decision]:
    return [await ratelimit.hit(redis, key, policy) for _ in range(n)]


async def test_burst_of_limit_then_refused(backend: tuple[aioredis.Redis, str]) -> None:
    redis, prefix = backend
    policy = Policy(3, 60)
    first = await spend(redis, prefix + "a", policy, 4)
    assert [d.allowed for d in first] == [True, True, True, False]
    assert [d.remaining for d in first] == [2, 1, 0, 0]
    assert not any(d.degraded for d in first)
    # One request comes back every window / limit = 20 s; the refusal says when.
    assert all(15 <= d.reset <= 20 for d in first), [d.reset for d in first]
    ttl = await redis.pttl(prefix + "a")
    assert 0 < ttl <= 60_000  # the bucket key expires once it would be full again


async def test_refusals_do_not_spend(backend: tuple[aioredis.Redis, str]) -> None:
    redis, prefix = backend
    policy = Policy(2, 60)
    await spend(redis, prefix + "a", policy, 2)
    stored = await redis.get(prefix + "a")
    refused = await spend(redis, prefix + "a", policy, 5)
    assert not any(d.allowed for d in refused)
    assert await redis.get(prefix + "a") == stored


async def test_budget_refills_at_the_policy_rate(backend: tuple[aioredis.Redis, str]) -> None:
    redis, prefix = backend
    policy = Policy(3, 60)
    key = prefix + "a"
    await spend(redis, key, policy, 3)
    assert not (await ratelimit.hit(redis, key, policy)).allowed
    # Move the stored arrival time back by one interval (20 s), as if 20 s had passed.
    tat = int(await redis.get(key) or b"0")
    await redis.set(key, str(tat - 20_000_000), px=60_000)
    again = await spend(redis, key, policy, 2)
    assert [d.allowed for d in again] == [True, False]


async def test_callers_do_not_share_buckets(backend: tuple[aioredis.Redis, str]) -> None:
    redis, prefix = backend
    policy = Policy(1, 60)
    assert (await ratelimit.hit(redis, prefix + "a", policy)).allowed
    assert not (await ratelimit.hit(redis, prefix + "a", policy)).allowed
    assert (await ratelimit.hit(redis, prefix + "b", policy)).allowed


@pytest.mark.parametrize(("limit", "window"), [(7, 60), (11, 86400), (3, 1), (1000, 3600)])
async def test_exactly_limit_in_a_burst(
    backend: tuple[aioredis.Redis, str], limit: int, window: int
) -> None:
    # Intervals that are not whole microseconds must not lose or gain a request. The burst is
    # pipelined so that it takes far less than one interval.
    redis, prefix = backend
    await ratelimit.hit(redis, prefix + "warm", Policy(limit, window))  # loads the script
    async with redis.pipeline(transaction=False) as pipe:
        for _ in range(limit + 1):
            pipe.evalsha(ratelimit._SHA, 1, prefix + "a", limit, window)
        raw = await pipe.execute()
    assert [int(r[0]) for r in raw] == [1] * limit + [0]
    assert [int(r[1]) for r in raw[:limit]] == list(range(limit - 1, -1, -1))


async def test_script_is_cached_and_reloaded() -> None:
    redis = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    policy = Policy(5, 60)
    assert await redis.script_exists(ratelimit._SHA) == [False]
    assert (await ratelimit.hit(redis, "k", policy)).remaining == 4
    assert await redis.script_exists(ratelimit._SHA) == [True]
    await redis.script_flush()  # as after a Redis restart
    assert (await ratelimit.hit(redis, "k", policy)).remaining == 3
    await redis.aclose()


async def test_unreachable_redis_fails_open() -> None:
    redis = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    policy = Policy(1, 60)
    decisions = await spend(redis, "k", policy, 3)
    assert all(d.allowed and d.degraded for d in decisions)
    await redis.aclose()


def test_outage_is_logged_once_per_burst() -> None:
    outage = _OutageLog(every=3600)
    assert outage.failed(ConnectionError("down")) is True
    assert [outage.failed(ConnectionError("down")) for _ in range(50)] == [False] * 50
    assert outage.failures == 51
    outage.succeeded()
    assert outage.since is None
    assert outage.failed(ConnectionError("down again")) is True


def test_outage_warning_repeats_while_it_lasts() -> None:
    outage = _OutageLog(every=0)
    assert outage.failed(ConnectionError("down")) is True
    assert outage.failed(ConnectionError("down")) is True


def test_policy_from_settings_and_refuses_zero() -> None:
    settings = Settings(app_env="development", rate_limit="250/hour", jwt_secret="k" * 40)
    assert Policy.from_settings(settings) == Policy(250, 3600)
    with pytest.raises(ValueError, match="at least 1"):
        Policy(0, 60)
