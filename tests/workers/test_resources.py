"""WorkerResources: one Context per worker loop, opened by core.context.open_context on first
use and closed with the worker."""

from __future__ import annotations

import asyncio

from config.connections import Connections
from config.settings import Settings
from workers.resources import WorkerResources


async def test_one_context_opened_once_and_closed(settings: Settings) -> None:
    resources = WorkerResources(Connections(settings))
    first, second = await asyncio.gather(resources.context(), resources.context())
    assert first is second
    await first.store.ping()
    assert await first.redis.ping()
    await resources.aclose()
    reopened = await resources.context()
    assert reopened is not first
    await reopened.store.ping()
    await resources.aclose()
