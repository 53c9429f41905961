"""Issue 7: security headers on the docs page and every answer; no unthrottled doors.

Before the fix ``/docs`` had no Content-Security-Policy, ``X-Frame-Options`` or ``nosniff``
and kept bearer tokens in localStorage; API answers lacked ``nosniff``; ``Server`` named
Python's and aiohttp's versions; admin routes answered bad tokens forever without a 429;
``/metrics`` and the OpenAPI document were unlimited, and a flood of ``/readyz`` became a
flood of pings to MongoDB and Redis.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from typing import Any

import pytest

import web.ratelimit
from config.settings import Settings
from core.ratelimit import Policy
from tests.conftest import bearer
from web.keys import CONTEXT


@pytest.fixture
def settings(make_settings: Any) -> Settings:
    """Three requests a minute, so a budget runs out in a few calls."""
    made: Settings = make_settings(rate_limit="3/minute")
    return made


def _directives(csp: str) -> dict[str, list[str]]:
    out = {}
    for part in csp.split(";"):
        name, *values = part.split()
        out[name] = values
    return out


async def test_docs_page_has_a_strict_policy_and_keeps_no_token(client: Any) -> None:
    resp = await client.get("/docs")
    assert resp.status == 200
    page = await resp.text()
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Referrer-Policy"] == "no-referrer"
    csp = _directives(resp.headers["Content-Security-Policy"])
    assert csp["default-src"] == ["'self'"]
    assert csp["frame-ancestors"] == ["'none'"]
    assert csp["object-src"] == ["'none'"]
    # Scripts: this server's files and exactly the page's own inline start-up script.
    [inline] = re.findall(r"<script>(.*?)</script>", page, flags=re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode()
    assert csp["script-src"] == ["'self'", f"'sha256-{digest}'"]
    assert "'unsafe-inline'" not in csp["script-src"]
    assert "'unsafe-eval'" not in csp["script-src"]
    # "Authorize" keeps the token in memory, never in localStorage.
    assert "persistAuthorization: false" in page
    assert "persistAuthorization: true" not in page


@pytest.mark.parametrize(
    "path",
    [
        "/healthz",
        "/api/v1/openapi.json",
        "/api/v1/me",  # 401 problem
        "/api/v1/nowhere",  # 404 problem
        "/docs/static/swagger-ui.css",
        "/admin",
    ],
)
async def test_every_answer_is_nosniff_and_names_no_version(client: Any, path: str) -> None:
    resp = await client.get(path)
    assert resp.headers["X-Content-Type-Options"] == "nosniff", path
    server = resp.headers["Server"]
    assert server == "taskmanager"
    assert not re.search(r"\d|python|aiohttp", server, flags=re.IGNORECASE)


async def test_dashboard_page_keeps_its_policy(client: Any) -> None:
    resp = await client.get("/admin")
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]


async def test_bad_tokens_on_admin_routes_are_throttled(client: Any) -> None:
    statuses = []
    for _ in range(4):
        resp = await client.get("/api/v1/admin/queues", headers=bearer("forged.token.x"))
        statuses.append(resp.status)
    assert statuses == [401, 401, 401, 429]
    assert int(resp.headers["Retry-After"]) >= 1
    assert resp.content_type == "application/problem+json"


async def test_metrics_and_document_have_a_per_address_budget(
    client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(web.ratelimit, "OPERATIONS_POLICY", Policy(4, 60, "operations"))
    for path in ("/metrics", "/api/v1/openapi.json"):
        statuses = [(await client.get(path)).status for _ in range(2)]
        assert statuses == [200, 200], path
    resp = await client.get("/metrics")
    assert resp.status == 429
    assert resp.content_type == "application/problem+json"
    assert int(resp.headers["Retry-After"]) >= 1
    assert resp.headers["RateLimit-Policy"] == '"operations";q=4;w=60'
    # The two share one budget, apart from the API's (RATE_LIMIT is 3/minute here).
    assert (await client.get("/api/v1/openapi.json")).status == 429
    # Probes are never limited.
    for _ in range(10):
        assert (await client.get("/healthz")).status == 200
        assert (await client.get("/readyz")).status == 200


async def test_a_readiness_flood_is_not_a_ping_flood(
    client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = client.app[CONTEXT]
    pings = {"mongodb": 0, "redis": 0}
    store_ping, redis_ping = ctx.store.ping, ctx.redis.ping

    async def count_store() -> None:
        pings["mongodb"] += 1
        await store_ping()

    async def count_redis() -> bool:
        pings["redis"] += 1
        return bool(await redis_ping())

    monkeypatch.setattr(ctx.store, "ping", count_store)
    monkeypatch.setattr(ctx.redis, "ping", count_redis)
    answers = await asyncio.gather(*(client.get("/readyz") for _ in range(100)))
    assert {resp.status for resp in answers} == {200}
    assert 1 <= pings["mongodb"] <= 2 and 1 <= pings["redis"] <= 2, pings
