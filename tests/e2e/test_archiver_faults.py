"""Archiver faults with real processes: ``taskmanager archiver`` SIGKILLed at random moments
(each time while a segment's ``.tmp`` is being written) while writes go on, restarted each
time. Afterwards the archive is one chain of contiguous, checked segments holding every write
exactly once (no gap, no event twice); ``backup restore --at`` the end equals the source; and
a dropped segment makes ``backup verify --at`` and ``backup restore --at`` refuse, naming it."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from pymongo import AsyncMongoClient

from config.settings import Settings
from core import archive
from tests.e2e.helpers import Proc, process_env, start, taskmanager_exe, wait_until

pytestmark = pytest.mark.timeout(120)

COLL = "tasks_faults"
KILLS = 3


async def _writer(
    coll: Any, final: dict[int, dict[str, Any]], ops: list[int], stop: asyncio.Event
) -> None:
    """Creates, updates and deletes; ``final`` is the state after the last acknowledged write,
    ``ops[0]`` the number of writes (each one change event)."""
    rng = random.Random(11)
    next_id = 0
    while not stop.is_set():
        op = rng.random()
        if op < 0.4 or len(final) < 5:
            doc = {"_id": next_id, "n": 0}
            await coll.insert_one(doc)
            final[next_id] = dict(doc)
            next_id += 1
        elif op < 0.85:
            key = rng.choice(sorted(final))
            await coll.update_one({"_id": key}, {"$inc": {"n": 1}})
            final[key] = {**final[key], "n": final[key]["n"] + 1}
        else:
            key = rng.choice(sorted(final))
            await coll.delete_one({"_id": key})
            del final[key]
        ops[0] += 1
        await asyncio.sleep(0.02)


def _segments(root: Path) -> list[archive.SegmentFile]:
    found = archive.chains(root)
    return archive.segments(found[-1]) if found else []


def _newer_than(root: Path, seq: int) -> Callable[[], bool]:
    return lambda: _segments(root)[-1].seq > seq


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [taskmanager_exe(), *args], env=env, capture_output=True, text=True, timeout=60
    )


async def test_killed_archiver_resumes_without_gap_or_duplicate(
    make_settings: Any, tmp_path: Path
) -> None:
    settings: Settings = make_settings(backup_dir=str(tmp_path / "backups"))
    root = Path(settings.backup_dir) / "archive"
    env = process_env(
        settings,
        APP_ENV="test",
        BACKUP_DIR=settings.backup_dir,
        ARCHIVE_INTERVAL="1",
        ARCHIVER_METRICS_PORT="0",
        LOG_FORMAT="console",
    )
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongodb_url)
    rds = redis.Redis.from_url(settings.redis_url or "")
    coll = client[settings.mongodb_db][COLL]
    final: dict[int, dict[str, Any]] = {}
    ops = [0]
    stop = asyncio.Event()
    procs: list[Proc] = [start(["archiver"], env)]
    writer: asyncio.Task[None] | None = None
    rng = random.Random()
    into = settings.mongodb_db + "_faults"
    try:
        await wait_until(
            lambda: len(_segments(root)) >= 1, timeout=30, what="a first segment", proc=procs[-1]
        )
        # Every write from here on comes after the chain's start: each must be archived.
        writer = asyncio.create_task(_writer(coll, final, ops, stop))
        backup = await asyncio.to_thread(_run, env, "backup", "create")
        assert backup.returncode == 0, backup.stderr

        for _ in range(KILLS):
            await asyncio.sleep(rng.uniform(0.3, 2.0))
            # Kill while a segment is half-written (the writer holds a .tmp almost always).
            await wait_until(
                lambda: bool(list(root.glob("*/*.tmp"))),
                timeout=10,
                what="a segment being written",
                proc=procs[-1],
            )
            procs[-1].stop(signal.SIGKILL)
            assert list(root.glob("*/*.tmp")), "no segment was half-written at the kill"
            seq_at_kill = _segments(root)[-1].seq
            # The lock of the killed leader would expire after its TTL (15 s): the test
            # deletes it instead of waiting.
            rds.delete(f"{settings.redis_prefix}archiver:leader")
            procs.append(start(["archiver"], env))
            await wait_until(
                _newer_than(root, seq_at_kill),
                timeout=30,
                what="a segment from the restarted archiver",
                proc=procs[-1],
            )
            assert "archive.partial_segment_discarded" in procs[-1].output()

        await asyncio.sleep(1.5)
        stop.set()
        assert writer is not None
        await writer
        t_end = datetime.now(UTC) + timedelta(milliseconds=5)
        await asyncio.sleep(0.1)
        await wait_until(
            lambda: check_covered(root, t_end), timeout=20, what="a segment covering T"
        )
        procs[-1].stop()

        # One chain (no gap started a new one), contiguous and checked.
        assert len(archive.chains(root)) == 1
        segs = _segments(root)
        assert [s.seq for s in segs] == list(range(1, len(segs) + 1))
        archive.check_chain(segs[0].path.parent, segs)
        assert not list(root.glob("*/*.tmp"))
        # Every write exactly once.
        ids: list[Any] = []
        for seg in segs:
            for event in archive.read_events(seg):
                if event.get("ns", {}).get("coll") == COLL:
                    ids.append(event["_id"]["_data"])
        assert len(ids) == len(set(ids)), "an event was archived twice"
        assert len(ids) == ops[0], f"{ops[0]} writes, {len(ids)} events archived"

        done = await asyncio.to_thread(
            _run, env, "backup", "restore", "--at", t_end.isoformat(), "--into", into, "--yes"
        )
        assert done.returncode == 0, done.stdout + done.stderr
        got = {d["_id"]: d async for d in client[into][COLL].find({})}
        assert got == final
        assert got == {d["_id"]: d async for d in coll.find({})}
        await client.drop_database(into)

        # A dropped segment: verify and restore refuse, naming it.
        victim = segs[len(segs) // 2]
        victim.path.unlink()
        name = f"{victim.seq:08d}_"
        checked = await asyncio.to_thread(_run, env, "backup", "verify", "--at", t_end.isoformat())
        assert checked.returncode != 0
        assert name in checked.stderr, checked.stdout + checked.stderr
        refused = await asyncio.to_thread(
            _run, env, "backup", "restore", "--at", t_end.isoformat(), "--into", into, "--yes"
        )
        assert refused.returncode != 0
        assert name in refused.stderr, refused.stdout + refused.stderr
        assert into not in await client.list_database_names()
    finally:
        stop.set()
        if writer is not None and not writer.done():
            writer.cancel()
        for proc in procs:
            proc.close()
        rds.close()
        await client.drop_database(into)
        await client.close()


def check_covered(root: Path, moment: datetime) -> bool:
    """Whether the newest segment covers every event up to ``moment``."""
    segs = _segments(root)
    if not segs:
        return False
    covered: datetime = archive.check_segment(segs[-1]).trailer["covered"]
    return covered >= moment
