"""The busy view over a real ``taskmanager worker`` process: while a slow message runs (a
welcome email whose SMTP server holds ``MAIL FROM``), ``GET /admin/workers``,
``GET /admin/overview`` and ``taskmanager workers`` show which thread runs which actor, message
and arguments, and for how long; with the process's memory, uptime and counts."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from cli.embedded import free_port
from tests.conftest import bearer, eventually, serving
from tests.e2e.helpers import process_env, taskmanager_exe
from tests.e2e.test_worker_crash import StallingSink, Workers, poll
from web.app import create_app

pytestmark = pytest.mark.timeout(120)

ADMIN = {"email": "root@example.com", "password": "admin password 1"}
WORKERS = "/api/v1/admin/workers"


@pytest.fixture
def sink() -> Iterator[StallingSink]:
    with serving(StallingSink(free_port())) as s:
        try:
            yield s
        finally:
            s.release.set()


async def test_busy_view_shows_the_slow_message_while_it_runs(
    make_settings: Any, aiohttp_client: Any, sink: StallingSink
) -> None:
    settings = make_settings(
        smtp_url=sink.url, admin_email=ADMIN["email"], admin_password=ADMIN["password"]
    )
    app = create_app(settings)
    client = await aiohttp_client(app)
    resp = await client.post("/api/v1/auth/login", json=ADMIN)
    auth = bearer((await resp.json())["access_token"])
    workers = Workers(settings)
    try:
        # Two threads: one holds the stalled email, the other stays free.
        proc = workers.start("--threads", "2", WORKER_METRICS_PORT="0")
        await poll(lambda: workers.registered(proc), timeout=30, what="the worker", procs=[proc])
        # The admin's own welcome is the first email: it stalls.
        await poll(sink.stalled.is_set, timeout=20, what="the email to start", procs=[proc])

        async def busy_row() -> dict[str, Any] | None:
            resp = await client.get(WORKERS, headers=auth)
            assert resp.status == 200, await resp.text()
            items = (await resp.json())["items"]
            if items and any(b["actor"] == "send_welcome_email" for b in items[0]["busy"]):
                return items[0]  # type: ignore[no-any-return]
            return None

        row = await eventually(busy_row, "a busy thread", describe=proc.describe)
        assert row["pid"] in proc.children()
        assert row["threads"] == 2
        assert row["in_flight"] == len(row["busy"])  # the login's cache refresh may run too
        assert row["rss_bytes"] > 10 * 2**20  # a Python process with our imports
        assert 0 < row["uptime_seconds"] < 120
        [busy] = [b for b in row["busy"] if b["actor"] == "send_welcome_email"]
        assert busy["actor"] == "send_welcome_email"
        assert busy["queue"] == "notifications"
        assert busy["thread"]
        assert busy["message_id"]
        # The event's ids and type, not its data; cut short.
        assert '"user.registered"' in busy["args_summary"]
        assert len(busy["args_summary"]) <= 160
        assert busy["started_at"].endswith("Z")
        first = busy["running_seconds"]
        await asyncio.sleep(1.5)
        again = await busy_row()
        assert again is not None
        [still] = [b for b in again["busy"] if b["actor"] == "send_welcome_email"]
        assert still["message_id"] == busy["message_id"]
        assert still["thread"] == busy["thread"]
        assert still["running_seconds"] >= first + 1

        # The overview carries the same rows, and the CLI prints them.
        resp = await client.get("/api/v1/admin/overview", headers=auth)
        body = await resp.json()
        [worker] = body["workers"]["items"]
        assert busy["message_id"] in [b["message_id"] for b in worker["busy"]]
        assert body["health"]["checks"]["workers"]["data"]["busy"] >= 1
        env = process_env(settings, WORKER_METRICS_PORT="0")
        done = await asyncio.to_thread(
            subprocess.run,
            [taskmanager_exe(), "workers"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        table = done.stdout
        assert "RSS" in table
        assert "UPTIME" in table
        assert "send_welcome_email" in table
        assert busy["message_id"] in table
        done = await asyncio.to_thread(
            subprocess.run,
            [taskmanager_exe(), "workers", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        [listed] = json.loads(done.stdout)
        [welcome] = [b for b in listed["busy"] if b["actor"] == "send_welcome_email"]
        assert welcome["message_id"] == busy["message_id"]
        assert welcome["started_at"].endswith("Z")

        # Released: the thread is free again, and the message counts as processed.
        sink.release.set()

        async def idle() -> dict[str, Any] | None:
            resp = await client.get(WORKERS, headers=auth)
            items = (await resp.json())["items"]
            if items and not items[0]["busy"] and items[0]["processed"] >= 1:
                return items[0]  # type: ignore[no-any-return]
            return None

        done_row = await eventually(idle, "the thread to be free", describe=proc.describe)
        assert done_row["in_flight"] == 0
        assert done_row["processed"] >= 1
    finally:
        workers.close()
