"""Issue 7: while MongoDB (or Redis) is unreachable the API answers 503 with Retry-After,
fast, and logs one line per outage.

Before the fix every read waited ``MONGODB_TIMEOUT_MS`` and answered 500 "unexpected error",
each with a logged traceback. The servers here are private ones this test stops and restarts.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from cli.embedded import EmbeddedMongo, PrivateRedis
from tests.config.logs import captured_logs
from tests.conftest import bearer, register
from web.app import create_app
from web.outages import RETRY_AFTER

pytestmark = pytest.mark.timeout(120)

TIMEOUT_MS = 3000


async def _is_503(resp: Any) -> None:
    assert resp.status == 503, await resp.text()
    assert resp.content_type == "application/problem+json"
    assert int(resp.headers["Retry-After"]) == RETRY_AFTER
    problem = await resp.json()
    assert problem["status"] == 503
    assert "unreachable" in problem["detail"]


async def test_mongodb_outage_is_503_fast_with_one_log_line(
    make_settings: Any, aiohttp_client: Any, tmp_path: Path
) -> None:
    mongo = EmbeddedMongo(str(tmp_path / "mongo")).start()
    try:
        settings = make_settings(log_format="json").model_copy(
            update={"mongodb_url": mongo.url, "mongodb_timeout_ms": TIMEOUT_MS}
        )
        with captured_logs(settings, process="web") as lines:
            # No outbox relay: its own retries and log lines are another subject.
            client = await aiohttp_client(create_app(settings, relay=False))
            token = (await register(client))["access_token"]
            auth = bearer(token)
            assert (await client.get("/api/v1/tasks", headers=auth)).status == 200

            mongo.stop()
            # The first request finds out (within the server-selection timeout)...
            started = time.monotonic()
            await _is_503(await client.post("/api/v1/tasks", json={"title": "x"}, headers=auth))
            assert time.monotonic() - started < TIMEOUT_MS / 1000 * 2 + 2
            # ...every later one is refused at once, reads and writes alike.
            for _ in range(5):
                started = time.monotonic()
                await _is_503(await client.get("/api/v1/tasks", headers=auth))
                await _is_503(await client.post("/api/v1/tasks", json={"t": 1}, headers=auth))
                assert time.monotonic() - started < 0.5
            # What needs no store still answers.
            assert (await client.get("/healthz")).status == 200
            assert (await client.get("/api/v1/openapi.json")).status == 200

            # Back: requests flow again within a probe or two.
            mongo.start()
            deadline = time.monotonic() + 15
            while (resp := await client.get("/api/v1/tasks", headers=auth)).status != 200:
                assert time.monotonic() < deadline, await resp.text()
                await asyncio.sleep(0.2)
            logged = lines()
    finally:
        mongo.stop()
    down = [line for line in logged if line["event"] == "dependency.unavailable"]
    assert len(down) == 1, down
    assert down[0]["dependency"] == "MongoDB"
    assert "exception" not in down[0]
    assert [line["dependency"] for line in logged if line["event"] == "dependency.recovered"] == [
        "MongoDB"
    ]
    assert not [line for line in logged if line["event"] == "http.unhandled_error"]
    assert not [line for line in logged if "exception" in line]


async def test_redis_outage_is_503_where_redis_is_needed(
    make_settings: Any, aiohttp_client: Any
) -> None:
    redis_server = PrivateRedis().start()
    try:
        settings = make_settings(log_format="json").model_copy(
            update={"redis_url": redis_server.url}
        )
        with captured_logs(settings, process="web") as lines:
            client = await aiohttp_client(create_app(settings, relay=False))
            tokens = [(await register(client))["access_token"] for _ in range(3)]
            redis_server.stop()
            # Signing out records the token in Redis's denylist: it cannot be done now.
            for token in tokens:
                await _is_503(await client.post("/api/v1/auth/logout", headers=bearer(token)))
            logged = lines()
    finally:
        redis_server.stop()
    down = [line for line in logged if line["event"] == "dependency.unavailable"]
    assert [line["dependency"] for line in down] == ["Redis"]
    assert not [line for line in logged if line["event"] == "http.unhandled_error"]
