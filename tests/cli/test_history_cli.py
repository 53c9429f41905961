"""``taskmanager stats --history [1h|24h]`` (counts a real worker wrote into real Redis) and
``taskmanager schedules history NAME`` (runs in SecantusDB): tables, ``--json``, ``Z`` times,
and a non-zero exit for an unknown job."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import dramatiq
from click.testing import CliRunner
from dramatiq import Worker
from pymongo import MongoClient

from cli.main import main
from cli.monitor import sparkline
from config.settings import Settings
from tests.cli.conftest import invoke
from workers.broker import Platform

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3})?Z$")


def test_sparkline_scales_and_groups() -> None:
    assert sparkline([0, 0, 0]) == "▁▁▁"
    assert sparkline([0, 1, 8]) == "▁▂█"
    assert sparkline([4, 8]) == "▅█"
    line = sparkline([1] * 144)  # 24 h: 3 points a character
    assert line == "█" * 48


def test_stats_history_shows_what_a_real_worker_did(ops_env: Settings, platform: Platform) -> None:
    queue = f"hist_{uuid.uuid4().hex[:8]}"
    done = threading.Semaphore(0)

    def work(fail: bool) -> None:
        done.release()
        if fail:
            raise ValueError("no")

    actor: Any = dramatiq.actor(  # type: ignore[call-overload]
        work, broker=platform.broker, queue_name=queue, actor_name=f"{queue}_a", throws=ValueError
    )
    worker = Worker(platform.broker, worker_threads=2, worker_timeout=100)
    worker.start()
    try:
        for fail in (False, False, False, True):
            actor.send(fail)
        for _ in range(4):
            assert done.acquire(timeout=15)

        def body(*args: str) -> dict[str, Any]:
            result = invoke("stats", *args, "--json")
            assert result.exit_code == 0, result.output
            found: dict[str, Any] = json.loads(result.output)
            return found

        deadline = time.monotonic() + 15
        while sum((body("--history")["queues"].get(queue) or {}).get("processed", [])) < 4:
            assert time.monotonic() < deadline, "the history never showed 4 messages"
            time.sleep(0.1)
        hour = body("--history")
        assert hour["window"] == "1h" and hour["step_seconds"] == 60
        assert ISO_Z.match(hour["since"]) and ISO_Z.match(hour["until"])
        assert sum(hour["queues"][queue]["failed"]) == 1
        assert len(hour["actors"][f"{queue}_a"]["processed"]) == 60
        day = body("--history", "24h")
        assert day["window"] == "24h" and len(day["queues"][queue]["processed"]) == 144
    finally:
        worker.stop(timeout=10_000)

    result = invoke("stats", "--history")
    assert result.exit_code == 0, result.output
    title, header, *rows = result.output.splitlines()
    assert title.startswith("1h from ") and "(one point per 60 s)" in title
    assert all(ISO_Z.match(word) for word in title.split()[2:5:2])
    assert header.split() == [
        "QUEUE",
        "PROCESSED",
        "FAILED",
        "FAILED%",
        "PROCESSED",
        "OVER",
        "TIME",
    ]
    [row] = [r for r in rows if r.split()[0] == queue]
    cells = row.split()
    assert cells[1:4] == ["4", "1", "25.0%"]
    assert len(cells[4]) == 60 and set(cells[4][:-2]) == {"▁"}  # only the last minutes
    assert set(cells[4][-2:]) - {"▁"}

    result = invoke("stats", "--history", "24h")
    assert result.exit_code == 0 and result.output.startswith("24h from ")
    assert "(one point per 600 s)" in result.output
    assert invoke("stats", "--history", "2h").exit_code == 2  # click's usage error
    assert invoke("stats", "--history", "--watch", "1").exit_code == 2


def test_stats_history_with_nothing_yet(ops_env: Settings) -> None:
    result = invoke("stats", "--history")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == "no messages processed in this window"
    body = json.loads(invoke("stats", "--history", "--json").output)
    assert body["queues"] == {} and body["actors"] == {}


def test_schedules_history_lists_the_latest_runs(ops_env: Settings) -> None:
    # Recent runs: job_runs has a 30-day TTL index on enqueued_at, whose monitor would delete
    # older ones in the middle of the test.
    base = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=2)
    last = f"{base + timedelta(hours=18):%Y-%m-%dT%H:%M:%S}"
    docs: list[dict[str, Any]] = [
        {
            "_id": f"backup:{n}",
            "job": "backup",
            "status": "succeeded",
            "manual": False,
            "scheduled_for": base + timedelta(hours=6 * n),
            "enqueued_at": base + timedelta(hours=6 * n),
            "started_at": base + timedelta(hours=6 * n, seconds=1),
            "finished_at": base + timedelta(hours=6 * n, seconds=31),
            "duration_ms": 30_000,
            "error": None,
        }
        for n in range(4)
    ]
    docs[-1].update(status="failed", error="disk full:\n  no space left on device")
    assert ops_env.mongodb_url
    client: MongoClient[dict[str, Any]] = MongoClient(ops_env.mongodb_url)
    with client:
        client[ops_env.mongodb_db]["job_runs"].insert_many(docs)

    result = invoke("schedules", "history", "backup", "--json")
    assert result.exit_code == 0, result.output
    runs = json.loads(result.output)
    assert [r["fire_key"] for r in runs] == ["backup:3", "backup:2", "backup:1", "backup:0"]
    assert runs[0]["status"] == "failed" and runs[0]["duration_seconds"] == 30.0
    assert runs[0]["scheduled_for"] == f"{last}.000Z"
    for name in ("scheduled_for", "enqueued_at", "started_at", "finished_at"):
        assert ISO_Z.match(runs[0][name]), runs[0][name]
    assert (
        len(json.loads(invoke("schedules", "history", "backup", "--limit", "2", "--json").output))
        == 2
    )

    result = invoke("schedules", "history", "backup")
    assert result.exit_code == 0, result.output
    header, *rows = result.output.splitlines()
    assert header.split() == [
        "FIRE", "KEY", "SCHEDULED", "STATUS", "STARTED", "DURATION", "MANUAL", "ERROR"
    ]  # fmt: skip
    assert len(rows) == 4
    first = rows[0].split()
    assert first[:6] == [
        "backup:3", f"{last}Z", "failed", f"{last[:-2]}01Z", "30.000s", "no"
    ]  # fmt: skip
    assert rows[0].endswith("disk full: no space left on device")

    empty = invoke("schedules", "history", "analytics-rollup")
    assert empty.exit_code == 0 and empty.output.strip() == "analytics-rollup: no runs"
    assert json.loads(invoke("schedules", "history", "analytics-rollup", "--json").output) == []

    unknown = CliRunner().invoke(main, ["schedules", "history", "nope"])
    assert unknown.exit_code == 1
    assert "no scheduled job named 'nope'" in unknown.output

    # The plain listing is unchanged by the new subcommand.
    listing = json.loads(invoke("schedules", "--json").output)
    [backup] = [row for row in listing if row["name"] == "backup"]
    assert backup["last"]["status"] == "failed"
