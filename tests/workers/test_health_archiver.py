"""The health summary's archiver check (workers/health.py) against a real archiver following
SecantusDB's change stream into the test's own BACKUP_DIR."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from config.connections import Connections
from core import archive
from core.context import Context, open_context
from workers.health import archiver_check


@pytest.fixture
async def ctx(make_settings: Any, tmp_path: Path) -> AsyncIterator[Context]:
    settings = make_settings(backup_dir=str(tmp_path / "backups"))
    async with open_context(settings, Connections(settings)) as ctx:
        yield ctx


async def test_the_archiver_check_reads_the_lag_once_an_archiver_recorded_it(ctx: Context) -> None:
    check = await archiver_check(ctx)
    assert check.status == "unknown"
    assert check.data == {"recorded": False}

    arch = archive.Archiver(ctx, interval=0.5, lock_ttl_ms=3000, heal=False)
    task = asyncio.create_task(arch.run())
    try:
        await ctx.store.db["items"].insert_one({"v": 1})
        async with asyncio.timeout(30):
            while arch.segments_written < 1:
                await asyncio.sleep(0.1)
        check = await archiver_check(ctx)
        assert check.status == "ok", check
        assert check.data["recorded"] is True
        assert 0 <= check.data["lag_seconds"] < 30
        assert check.data["leader"] == arch.lock.instance
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    # Stopped: the leader is gone, the recorded lag stays (and grows).
    check = await archiver_check(ctx)
    assert check.data["recorded"] is True
    assert check.data["leader"] is None
