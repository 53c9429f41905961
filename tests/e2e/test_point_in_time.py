"""Point-in-time restore with real processes: ``taskmanager archiver`` and ``taskmanager backup
create`` run while writes go on; ``taskmanager backup restore --at`` brings back the database as
the test's ledger says it was at two moments; a moment before the oldest full backup and a
damaged segment are refused."""

from __future__ import annotations

import asyncio
import random
import socket
import subprocess
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pymongo import AsyncMongoClient

from config.settings import Settings
from tests.e2e.helpers import process_env, start, taskmanager_exe

pytestmark = pytest.mark.timeout(120)

Ledger = list[tuple[datetime, dict[int, dict[str, Any]]]]


async def _writer(coll: Any, ledger: Ledger, stop: asyncio.Event) -> None:
    """Creates, updates and deletes, recording the state after each acknowledged write."""
    state: dict[int, dict[str, Any]] = {}
    rng = random.Random(7)
    next_id = 0
    while not stop.is_set():
        op = rng.random()
        if op < 0.4 or len(state) < 5:
            doc = {"_id": next_id, "n": 0, "title": f"task {next_id}"}
            await coll.insert_one(doc)
            state[next_id] = dict(doc)
            next_id += 1
        elif op < 0.85:
            key = rng.choice(sorted(state))
            await coll.update_one({"_id": key}, {"$inc": {"n": 1}, "$set": {"tag": op}})
            state[key] = {**state[key], "n": state[key]["n"] + 1, "tag": op}
        else:
            key = rng.choice(sorted(state))
            await coll.delete_one({"_id": key})
            del state[key]
        ledger.append((datetime.now(UTC), {k: dict(v) for k, v in state.items()}))
        await asyncio.sleep(0.02)


def _state_at(ledger: Ledger, moment: datetime) -> dict[int, dict[str, Any]]:
    before = [s for t, s in ledger if t <= moment]
    return before[-1] if before else {}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def _restore(env: dict[str, str], at: datetime, into: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [taskmanager_exe(), "backup", "restore", "--at", at.isoformat(), "--into", into, "--yes"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_restore_to_moments_while_writes_continue(make_settings: Any, tmp_path: Path) -> None:
    settings: Settings = make_settings(backup_dir=str(tmp_path / "backups"))
    metrics_port = _free_port()
    env = process_env(
        settings,
        APP_ENV="test",
        BACKUP_DIR=settings.backup_dir,
        ARCHIVE_INTERVAL="1",
        HOST="127.0.0.1",
        ARCHIVER_METRICS_PORT=str(metrics_port),
        LOG_FORMAT="console",
    )
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongodb_url)
    coll = client[settings.mongodb_db]["tasks_pitr"]
    ledger: Ledger = []
    stop = asyncio.Event()
    before_all = datetime.now(UTC)
    writer = asyncio.create_task(_writer(coll, ledger, stop))
    archiver = start(["archiver"], env)
    into = settings.mongodb_db + "_pitr"
    try:
        await asyncio.sleep(2)
        backup = await asyncio.to_thread(
            subprocess.run,
            [taskmanager_exe(), "backup", "create"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert backup.returncode == 0, backup.stderr
        await asyncio.sleep(6)
        # The archiver's lag, as Prometheus scrapes it: a second or two at ARCHIVE_INTERVAL=1.
        metrics = await asyncio.to_thread(_scrape, f"http://127.0.0.1:{metrics_port}/metrics")
        assert 0 <= metrics["taskmanager_archive_lag_seconds"] < 10, metrics
        assert metrics["taskmanager_archive_leader"] == 1
        stop.set()
        await writer
        t_end = ledger[-1][0] + timedelta(milliseconds=5)
        await asyncio.sleep(3.5)  # the archiver closes segments covering T
        archiver.stop()

        earlier = ledger[len(ledger) - 100][0] + timedelta(milliseconds=5)
        for moment in (earlier, t_end):
            done = await asyncio.to_thread(_restore, env, moment, into + "x")
            assert done.returncode == 0, done.stdout + done.stderr
            got = {d["_id"]: d async for d in client[into + "x"]["tasks_pitr"].find({})}
            assert got == _state_at(ledger, moment), moment
            await client.drop_database(into + "x")

        refused = await asyncio.to_thread(_restore, env, before_all - timedelta(minutes=5), into)
        assert refused.returncode != 0
        assert "before the oldest full backup" in refused.stderr

        chain = sorted(p for p in (Path(settings.backup_dir) / "archive").iterdir() if p.is_dir())
        segs = sorted(p for p in chain[-1].iterdir() if p.name.endswith(".jsonl.gz"))
        victim = segs[len(segs) // 2]
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x10
        victim.write_bytes(bytes(data))
        damaged = await asyncio.to_thread(_restore, env, t_end, into)
        assert damaged.returncode != 0
        assert victim.name in damaged.stderr
        assert into not in await client.list_database_names()
    finally:
        stop.set()
        if not writer.done():
            writer.cancel()
        archiver.close()
        await client.drop_database(into + "x")
        await client.close()
