"""The API rate limit over HTTP, on the real Redis (RATE_LIMIT=3/minute)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

from cli.embedded import PrivateRedis
from config.settings import Settings
from tests.conftest import bearer, register
from web.app import create_app
from web.ratelimit import client_address

pytestmark = pytest.mark.timeout(90)

POLICY = '"default";q=3;w=60'
BAD_LOGIN = {"email": "nobody@example.com", "password": "wrong password 1"}


@pytest.fixture
def settings(make_settings: Any) -> Settings:
    """Three requests a minute, so a budget runs out in a few calls."""
    made: Settings = make_settings(rate_limit="3/minute")
    return made


def service_limit(resp: Any) -> tuple[int, int]:
    """The (r, t) of a ``RateLimit`` field, checking its shape."""
    value = resp.headers["RateLimit"]
    name, r, t = value.split(";")
    assert name == '"default"'
    assert r.startswith("r=") and t.startswith("t="), value
    return int(r[2:]), int(t[2:])


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_normal_responses_carry_the_fields(client: Any) -> None:
    resp = await client.post(
        "/api/v1/auth/register",
        json={"email": "ann@example.com", "password": "correct horse 1", "name": "Ann"},
    )
    assert resp.status == 201
    assert resp.headers["RateLimit-Policy"] == POLICY
    remaining, reset = service_limit(resp)
    assert remaining == 2
    assert 1 <= reset <= 20  # one request comes back every 60 / 3 s
    token = (await resp.json())["access_token"]
    resp = await client.get("/api/v1/me", headers=bearer(token))
    assert resp.status == 200
    assert resp.headers["RateLimit-Policy"] == POLICY
    assert service_limit(resp)[0] == 2  # the user's own budget, not the address's
    # Error answers of limited routes carry them too.
    resp = await client.post("/api/v1/auth/login", json=BAD_LOGIN)
    assert resp.status == 401
    assert resp.headers["RateLimit-Policy"] == POLICY
    assert service_limit(resp)[0] == 1


async def test_fourth_request_is_429_problem(client: Any) -> None:
    token = (await register(client))["access_token"]
    before = metric("ratelimit_rejected_total", caller="user")
    for expected in (2, 1, 0):
        resp = await client.get("/api/v1/me", headers=bearer(token))
        assert resp.status == 200
        assert service_limit(resp)[0] == expected
    resp = await client.get("/api/v1/me", headers=bearer(token))
    assert resp.status == 429
    assert resp.content_type == "application/problem+json"
    problem = await resp.json()
    assert problem["status"] == 429
    assert problem["type"].endswith("/rate-limited")
    assert "3 requests per 60 s" in problem["detail"]
    retry_after = int(resp.headers["Retry-After"])
    assert 1 <= retry_after <= 20
    assert resp.headers["RateLimit-Policy"] == POLICY
    # Retry-After points no earlier than the end of the effective window.
    assert service_limit(resp) == (0, retry_after)
    assert resp.headers["X-Request-ID"]
    assert metric("ratelimit_rejected_total", caller="user") == before + 1


async def test_users_and_addresses_have_their_own_budgets(client: Any) -> None:
    ann = (await register(client))["access_token"]  # the address spends 1
    bob = (await register(client))["access_token"]  # the address spends 2
    for _ in range(3):
        assert (await client.get("/api/v1/me", headers=bearer(ann))).status == 200
    assert (await client.get("/api/v1/me", headers=bearer(ann))).status == 429
    resp = await client.get("/api/v1/me", headers=bearer(bob))
    assert resp.status == 200
    assert service_limit(resp)[0] == 2
    # Anonymous calls from the same address spend the address's budget, not the users'.
    resp = await client.post("/api/v1/auth/login", json=BAD_LOGIN)
    assert resp.status == 401
    assert service_limit(resp)[0] == 0
    resp = await client.post("/api/v1/auth/login", json=BAD_LOGIN)
    assert resp.status == 429
    assert (await resp.json())["status"] == 429
    assert (await client.get("/api/v1/me", headers=bearer(bob))).status == 200


async def test_bad_credentials_spend_the_address_budget(client: Any) -> None:
    for expected in (2, 1, 0):
        resp = await client.get("/api/v1/me", headers=bearer("not-a-token"))
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert service_limit(resp)[0] == expected
    resp = await client.get("/api/v1/me", headers=bearer("not-a-token"))
    assert resp.status == 429
    assert resp.headers["Retry-After"]


async def test_budget_holds_across_replicas(settings: Settings, aiohttp_client: Any) -> None:
    one = await aiohttp_client(create_app(settings))
    two = await aiohttp_client(create_app(settings))
    token = (await register(one))["access_token"]
    seen = []
    for replica in (two, one, two):
        resp = await replica.get("/api/v1/me", headers=bearer(token))
        assert resp.status == 200
        seen.append(service_limit(resp)[0])
    assert seen == [2, 1, 0]
    assert (await one.get("/api/v1/me", headers=bearer(token))).status == 429
    assert (await two.get("/api/v1/me", headers=bearer(token))).status == 429
    # The address budget is shared too: the registration on `one` spent one of it.
    resp = await two.post("/api/v1/auth/login", json=BAD_LOGIN)
    assert service_limit(resp)[0] == 1


async def test_operations_endpoints_are_not_limited(client: Any) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/api/v1/openapi.json") * 2:
        resp = await client.get(path)
        assert resp.status == 200, path
        assert "RateLimit" not in resp.headers
        assert "RateLimit-Policy" not in resp.headers
    # ...and they spent nothing of the address's budget.
    resp = await client.post("/api/v1/auth/login", json=BAD_LOGIN)
    assert service_limit(resp)[0] == 2


async def test_all_in_one_stand_in_limits_too(make_settings: Any, aiohttp_client: Any) -> None:
    # No REDIS_URL: the app runs on fakeredis (as `taskmanager run` does), Lua included.
    settings = make_settings(rate_limit="3/minute", redis_url=None)
    client = await aiohttp_client(create_app(settings, relay=False))
    statuses = []
    for _ in range(4):
        resp = await client.post("/api/v1/auth/login", json=BAD_LOGIN)
        statuses.append(resp.status)
    assert statuses == [401, 401, 401, 429]
    assert service_limit(resp) == (0, int(resp.headers["Retry-After"]))


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A Redis of this test's own, to stop (torn down after the settings that use it)."""
    server = PrivateRedis().start()
    try:
        yield server
    finally:
        server.stop()


async def test_redis_outage_fails_open(
    private_redis: PrivateRedis, make_settings: Any, aiohttp_client: Any
) -> None:
    settings = make_settings(rate_limit="3/minute", redis_url=private_redis.url)
    client = await aiohttp_client(create_app(settings, relay=False))
    resp = await client.post("/api/v1/auth/login", json=BAD_LOGIN)
    assert resp.status == 401
    assert service_limit(resp)[0] == 2

    await asyncio.to_thread(private_redis.stop)
    try:
        before = metric("ratelimit_failopen_total")
        for _ in range(5):  # more than the budget: nothing is counted, nothing is refused
            resp = await client.post("/api/v1/auth/login", json=BAD_LOGIN)
            assert resp.status == 401, await resp.text()
            assert resp.headers["RateLimit-Policy"] == POLICY
            assert "RateLimit" not in resp.headers  # the current limit is unknown: not made up
        assert metric("ratelimit_failopen_total") == before + 5
        # Writes still succeed, and their tokens work (revocation falls back to MongoDB).
        token = (await register(client))["access_token"]
        assert (await client.get("/api/v1/me", headers=bearer(token))).status == 200
        assert (await client.get("/healthz")).status == 200
    finally:
        # Redis comes back (empty, as after a restart); the fixtures can clean up again.
        await asyncio.to_thread(private_redis.start)

    # Limiting resumes on its own once Redis answers.
    for _ in range(10):
        resp = await client.post("/api/v1/auth/login", json=BAD_LOGIN)
        if "RateLimit" in resp.headers:
            break
    assert service_limit(resp)[0] == 2


def test_addresses_are_grouped_sensibly() -> None:
    assert client_address("203.0.113.7") == "203.0.113.7"
    assert client_address("::ffff:203.0.113.7") == "203.0.113.7"
    assert client_address("2001:db8:1:2:aaaa::1") == client_address("2001:db8:1:2:bbbb::9")
    assert client_address("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert client_address("2001:db8:1:3::1") != client_address("2001:db8:1:2::1")
    assert client_address(None) == "unknown"
