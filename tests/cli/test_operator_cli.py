"""The operator CLI (issue 9): ``workers`` and ``stats`` over a real Redis broker with a live
worker, ``stats --watch`` (bounded), ``--json`` on every read command with ISO 8601 ``Z``
times, exit codes scripts alert on, ``--redis-url``, no ``JWT_SECRET`` for read-only commands,
and commands run beside a real ``taskmanager run`` with no settings at all."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dramatiq
import pytest
from dramatiq import Worker

from cli.embedded import free_port
from config.settings import Settings
from tests.cli.conftest import invoke
from tests.e2e.helpers import clean_env, start, taskmanager_exe, wait_http
from workers.broker import Platform

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3})?Z$")


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "it") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


@pytest.fixture
def busy_worker(platform: Platform) -> Iterator[tuple[Worker, threading.Event]]:
    """A live worker (registered, beating) that has run one message well and one badly, and
    is running a third until the event is set."""
    release = threading.Event()

    def ok() -> None:
        pass

    def hold() -> None:
        release.wait(20)

    queue = "notifications"  # a queue the CLI knows (declared by the catalogue)
    ok_actor: Any = dramatiq.actor(ok, broker=platform.broker, queue_name=queue, actor_name="op_ok")
    hold_actor: Any = dramatiq.actor(
        hold, broker=platform.broker, queue_name=queue, actor_name="op_hold"
    )
    worker = Worker(platform.broker, worker_threads=2, worker_timeout=100)
    worker.start()
    try:
        ok_actor.send()
        platform.actors["send_welcome_email"].send({})  # not an event: dies at once
        hold_actor.send()
        yield worker, release
    finally:
        release.set()
        worker.stop(timeout=10_000)


def test_workers_and_stats_show_a_live_worker(
    ops_env: Settings, platform: Platform, busy_worker: tuple[Worker, threading.Event]
) -> None:
    platform.actors["send_welcome_email"].send_with_options(args=({},), delay=600_000)

    def stats() -> dict[str, Any]:
        result = invoke("stats", "--json")
        assert result.exit_code == 0, result.output
        body: dict[str, Any] = json.loads(result.output)
        return body

    totals = wait_for(
        lambda: (s := stats())["processed"] >= 1 and s["failed"] >= 1 and s["busy"] == 1 and s,
        what="one processed, one failed, one busy",
    )
    assert totals["workers"] == 1 and totals["threads"] == 2
    assert totals["dead"] == 1
    assert totals["scheduled"] == 1 and totals["retrying"] == 0
    assert totals["enqueued"] == 0
    assert ISO_Z.match(totals["at"]), totals["at"]

    result = invoke("stats")
    assert result.exit_code == 0, result.output
    lines = dict(line.split(None, 1) for line in result.output.splitlines())
    assert lines["busy"] == "1" and lines["dead"] == "1" and lines["scheduled"] == "1"

    result = invoke("workers", "--json")
    assert result.exit_code == 0, result.output
    [worker] = json.loads(result.output)
    assert worker["in_flight"] == 1 and worker["threads"] == 2
    assert worker["processed"] >= 1 and worker["failed"] >= 1
    assert "notifications" in worker["queues"]
    assert ISO_Z.match(worker["started_at"]) and ISO_Z.match(worker["last_beat"])

    [running] = worker["busy"]
    assert (running["actor"], running["queue"]) == ("op_hold", "notifications")
    assert worker["rss_bytes"] > 0 and worker["uptime_seconds"] >= 0

    result = invoke("workers")
    assert result.exit_code == 0, result.output
    header, row, blank, busy_header, busy_row = result.output.splitlines()
    assert blank == ""
    assert header.split() == [
        "ID", "HOST", "PID", "STATE", "THREADS", "BUSY", "PROCESSED", "FAILED", "RSS", "UPTIME",
        "STARTED", "BEAT",
    ]  # fmt: skip
    cells = row.split()
    assert cells[3:6] == ["running", "2", "1"]
    assert cells[8].endswith("MiB")
    assert ISO_Z.match(cells[10]), cells[10]
    assert busy_header.split() == [
        "WORKER", "THREAD", "ACTOR", "QUEUE", "MESSAGE", "RUNNING", "STARTED", "ARGS"
    ]  # fmt: skip
    assert busy_row.split()[2:5] == ["op_hold", "notifications", running["message_id"]]


def test_no_workers_is_said(ops_env: Settings) -> None:
    result = invoke("workers")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "no live workers"
    assert json.loads(invoke("workers", "--json").output) == []


def test_stats_watch_is_bounded(ops_env: Settings) -> None:
    started = time.monotonic()
    result = invoke("stats", "--json", "--watch", "0.2", "--count", "3")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert len(rows) == 3
    assert time.monotonic() - started >= 0.4
    assert len({r["at"] for r in rows}) == 3
    table = invoke("stats", "--watch", "0.1", "--count", "2")
    assert table.exit_code == 0, table.output
    assert sum(line.startswith("-- ") for line in table.output.splitlines()) == 2


@pytest.mark.parametrize(
    "command",
    [
        ["queues"],
        ["dead", "list"],
        ["workers"],
        ["stats"],
        ["schedules"],
        ["outbox", "status"],
        ["outbox", "list-set-aside"],
    ],
)
def test_every_read_command_has_json_and_needs_no_jwt_secret(
    ops_env: Settings, command: list[str]
) -> None:
    result = invoke(*command, "--json")
    assert result.exit_code == 0, result.output
    json.loads(result.output)


def test_schedules_json_and_table_times_are_iso_utc(ops_env: Settings) -> None:
    rows = json.loads(invoke("schedules", "--json").output)
    assert {"name", "trigger", "next", "last", "leader"} <= rows[0].keys()
    header, *_ = invoke("schedules").output.splitlines()
    assert header.split() == ["NAME", "TRIGGER", "NEXT", "LAST", "LEADER"]


def test_dead_letter_times_are_iso_utc(
    ops_env: Settings, platform: Platform, busy_worker: tuple[Worker, threading.Event]
) -> None:
    wait_for(lambda: json.loads(invoke("dead", "list", "--json").output)["items"], what="dead")
    [item] = json.loads(invoke("dead", "list", "--json").output)["items"]
    assert ISO_Z.match(item["failed_at"]) and ISO_Z.match(item["enqueued_at"])
    _, row = invoke("dead", "list").output.splitlines()
    assert ISO_Z.match(row.split()[3]), row


def test_exit_codes_scripts_can_alert_on(ops_env: Settings, platform: Platform) -> None:
    platform.actors["send_welcome_email"].send({})
    time.sleep(0.3)

    breached = invoke("queues", "--max-age", "0.1")
    assert breached.exit_code == 1, breached.output
    assert "breach: notifications" in breached.output
    assert invoke("queues", "--json", "--max-age", "0.1").exit_code == 1
    assert invoke("queues", "--max-age", "3600").exit_code == 0

    unknown = invoke("dead", "retry", "--queue", "notifications", "--ids", "no-such-id")
    assert unknown.exit_code == 1, unknown.output
    assert "no-such-id" in unknown.output
    assert invoke("dead", "list", "--queue", "nope").exit_code == 1


def test_outbox_replay_of_an_unknown_id_fails(
    cli_env: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke("outbox", "replay", "--ids", "0123456789abcdef01234567")
    assert result.exit_code == 1, result.output


def test_redis_url_option_replaces_the_environment(
    ops_env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REDIS_URL")
    refused = invoke("stats")
    assert refused.exit_code == 1
    assert "REDIS_URL must be set" in refused.output
    assert ops_env.redis_url
    result = invoke("--redis-url", ops_env.redis_url, "stats", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["workers"] == 0


def test_a_run_without_redis_is_named_as_unreachable(
    ops_env: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A ``taskmanager run`` with no REDIS_URL keeps its queues in its own process: the
    commands say so instead of a bare "must be set"."""
    monkeypatch.delenv("REDIS_URL")
    data = tmp_path / "elsewhere"
    data.mkdir()
    (data / "urls.json").write_text(
        json.dumps({"MONGODB_URL": ops_env.mongodb_url, "REDIS_URL": None, "BROKER_URL": None})
    )
    result = invoke("--data-dir", str(data), "workers")
    assert result.exit_code == 1
    assert "fakeredis" in result.output and "cannot reach" in result.output


@pytest.mark.timeout(150)
async def test_commands_beside_taskmanager_run_need_no_settings(
    settings: Settings, tmp_path: Path
) -> None:
    """``taskmanager run`` (embedded MongoDB, the shared Redis) writes its data directory's
    urls.json; ``workers``, ``stats``, ``queues`` and ``schedules`` run in the same directory
    with no product variable at all (no URLs, no JWT_SECRET) and reach it."""
    assert settings.redis_url
    port = free_port()
    env = clean_env(
        REDIS_URL=settings.redis_url,
        REDIS_PREFIX=settings.redis_prefix,
        HOST="127.0.0.1",
        LOG_FORMAT="json",
    )
    proc = start(["run", "--memory", "--port", str(port)], env, cwd=str(tmp_path))
    urls = tmp_path / ".taskmanager-data" / "urls.json"
    try:
        await wait_http(proc, f"http://127.0.0.1:{port}/readyz", timeout=60)
        written = json.loads(urls.read_text())
        assert urls.stat().st_mode & 0o777 == 0o600
        assert written["REDIS_URL"] == settings.redis_url
        assert written["MONGODB_URL"].startswith("mongodb://127.0.0.1:")

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [taskmanager_exe(), *args],
                env=clean_env(),
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=60,
            )

        def one_worker() -> Any:
            out = cli("workers", "--json")
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout)

        [worker] = wait_for(one_worker, timeout=30, what="run's worker threads registered")
        assert worker["threads"] >= 4
        stats = cli("stats", "--json")
        assert stats.returncode == 0, stats.stderr
        assert json.loads(stats.stdout)["workers"] == 1
        queues = cli("queues")
        assert queues.returncode == 0, queues.stderr
        assert "outbox: 0 event(s) pending" in queues.stdout  # MongoDB reached too
        schedules = cli("schedules", "--json")
        assert schedules.returncode == 0, schedules.stderr
        assert json.loads(schedules.stdout)
    finally:
        proc.close()
    assert not urls.exists(), "a clean stop removes urls.json"
