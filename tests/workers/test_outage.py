"""Redis (cache, limits, broker) goes away while the API takes writes: every write succeeds,
its events wait in the MongoDB outbox, and their side effects arrive once Redis is back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cli.embedded import PrivateRedis
from tests.conftest import SmtpSink, bearer, register
from web.app import create_app
from web.keys import CONTEXT

pytestmark = pytest.mark.timeout(120)


async def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


class Restartable:
    """The test's private Redis, restarted on the same port; stopped after the worker."""

    def __init__(self) -> None:
        self.server = PrivateRedis().start()

    def stop(self) -> None:
        self.server.stop()

    def restart(self) -> None:
        self.server = PrivateRedis(port=self.server.port).start()


@pytest.fixture
def private_redis() -> Iterator[Restartable]:
    """Requested before ``worker_for``, so it is torn down after the worker has stopped (a
    Dramatiq worker stopping while its Redis is away waits out its reconnect back-off)."""
    redis = Restartable()
    yield redis
    redis.stop()


async def test_writes_during_redis_outage_keep_their_side_effects(
    private_redis: Restartable,
    make_settings: Any,
    aiohttp_client: Any,
    smtp: SmtpSink,
    worker_for: Any,
) -> None:
    app = create_app(make_settings(redis_url=private_redis.server.url, smtp_url=smtp.url))
    client = await aiohttp_client(app)
    worker_for(app)
    before = await register(client, "before@example.com")
    await smtp.wait_for(1)
    auth = bearer(before["access_token"])
    stats = await client.get("/api/v1/tasks/stats", headers=auth)
    assert (await stats.json())["total"] == 0

    private_redis.stop()
    during = await register(client, "during@example.com")
    created = await client.post("/api/v1/tasks", json={"title": "in the dark"}, headers=auth)
    assert created.status == 201, await created.text()
    # Reads still answer (cache fails open to MongoDB) and see the write.
    stats = await client.get("/api/v1/tasks/stats", headers=auth)
    assert stats.status == 200
    assert (await stats.json())["total"] == 1
    events = app[CONTEXT].store["events"]
    pending = await events.count_documents({"pending": True, "user_id": during["user"]["id"]})
    assert pending == 1, "the registration's event waits in the outbox"

    private_redis.restart()
    messages = await smtp.wait_for(2, timeout=30)
    assert sorted(m["To"] for m in messages) == ["before@example.com", "during@example.com"]

    async def drained() -> bool:
        return await events.count_documents({"pending": True}) == 0

    await _wait(drained, 30, "the outbox to drain")
    # The stale cache entry written before the outage is not served after it.
    stats = await client.get("/api/v1/tasks/stats", headers=auth)
    assert (await stats.json())["total"] == 1
