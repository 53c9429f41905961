"""One Redis round trip for what an authenticated read asks first (core/gate.py): revocation,
rate limit and, for the stats and the first page, the cache. Over the real Redis: the
commands the app sends for one user's request are counted at the client."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import bearer, register
from web.keys import CONTEXT

T = "/api/v1/tasks"


@pytest.fixture
async def user(client: Any) -> tuple[dict[str, str], str]:
    pair = await register(client)
    return bearer(pair["access_token"]), str(pair["user"]["id"])


def _count_commands(client: Any, user_id: str) -> list[tuple[Any, ...]]:
    """Record every command the app's Redis client sends naming ``user_id``'s keys."""
    redis = client.app[CONTEXT].redis
    original = redis.execute_command
    sent: list[tuple[Any, ...]] = []

    async def counting(*args: Any, **options: Any) -> Any:
        if any(user_id in str(a) for a in args):
            sent.append(args)
        return await original(*args, **options)

    redis.execute_command = counting
    return sent


@pytest.mark.parametrize("path", [f"{T}/stats", T])
async def test_a_cache_hit_costs_one_round_trip(
    client: Any, user: tuple[dict[str, str], str], path: str
) -> None:
    auth, user_id = user
    assert (await client.post(T, json={"title": "t"}, headers=auth)).status == 201
    first = await client.get(path, headers=auth)
    assert first.status == 200
    sent = _count_commands(client, user_id)
    again = await client.get(path, headers=auth)
    assert again.status == 200 and await again.json() == await first.json()
    assert [c[0] for c in sent] == ["EVALSHA"], sent
    if path.endswith("stats"):
        assert again.headers["X-Cache"] == "hit"
    # The rate limit was spent and its fields are on the answer.
    assert again.headers["RateLimit"].startswith('"default";r=')


async def test_a_write_is_never_followed_by_a_stale_prefetched_read(
    client: Any, user: tuple[dict[str, str], str]
) -> None:
    auth, _ = user
    await client.get(f"{T}/stats", headers=auth)
    for n in range(1, 4):
        assert (await client.post(T, json={"title": f"t{n}"}, headers=auth)).status == 201
        stats = await (await client.get(f"{T}/stats", headers=auth)).json()
        page = await (await client.get(T, headers=auth)).json()
        assert stats["total"] == n and len(page["items"]) == n


async def test_other_lists_read_the_cache_only_when_cached(
    client: Any, user: tuple[dict[str, str], str]
) -> None:
    """A list with a query is not the cached first page: the admission reads no cache."""
    auth, user_id = user
    sent = _count_commands(client, user_id)
    assert (await client.get(T, params={"status": "todo"}, headers=auth)).status == 200
    assert [c[0] for c in sent] == ["EVALSHA"], sent


async def test_a_revoked_token_spends_nothing_of_its_users_budget(
    client: Any, user: tuple[dict[str, str], str]
) -> None:
    auth, user_id = user
    assert (await client.get("/api/v1/me", headers=auth)).status == 200
    assert (await client.post("/api/v1/auth/logout", headers=auth)).status == 204
    ctx = client.app[CONTEXT]
    bucket = ctx.key("ratelimit", f"user:{user_id}")
    before = await ctx.redis.get(bucket)
    assert before is not None  # /me and the logout spent from it
    refused = await client.get(f"{T}/stats", headers=auth)
    assert refused.status == 401
    assert (await refused.json())["detail"] == "Token has been revoked"
    assert await ctx.redis.get(bucket) == before
