"""``taskmanager run --memory`` as a real process: embedded SecantusDB child, fakeredis,
in-process worker threads, a real SMTP sink; the account flow over HTTP; a clean stop."""

from __future__ import annotations

import json
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cli.embedded import free_port
from tests.conftest import SmtpSink
from tests.e2e.helpers import (
    Proc,
    clean_env,
    cmdline,
    pid_alive,
    port_open,
    start,
    wait_http,
    wait_until,
)

pytestmark = pytest.mark.timeout(150)


def _embedded_child(proc: Proc) -> tuple[int, int]:
    """The pid and port of the ``secantusd-py`` child of ``proc``."""
    children = [pid for pid in proc.children() if "secantusd-py" in " ".join(cmdline(pid))]
    assert len(children) == 1, f"expected one secantusd-py child, got {children}"
    argv = cmdline(children[0])
    return children[0], int(argv[argv.index("--port") + 1])


@pytest.fixture
def run_env(smtp: SmtpSink) -> dict[str, str]:
    """APP_ENV, MONGODB_URL and REDIS_URL unset: embedded database and fakeredis."""
    return clean_env(SMTP_URL=smtp.url, LOG_FORMAT="json", HOST="127.0.0.1")


@pytest.fixture
def workdir(tmp_path: Path) -> str:
    """A working directory, so nothing lands in the repository."""
    return str(tmp_path)


def _json_lines(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


async def test_all_in_one_account_flow_and_clean_shutdown(
    run_env: dict[str, str], workdir: str, smtp: SmtpSink
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start(["run", "--memory", "--port", str(port)], run_env, cwd=workdir)
    try:
        await wait_http(proc, f"{base}/healthz")
        await wait_http(proc, f"{base}/readyz")
        child, mongo_port = _embedded_child(proc)
        assert port_open(mongo_port)

        email = f"e2e-{uuid.uuid4().hex[:8]}@example.com"
        password = "correct horse 1"
        async with aiohttp.ClientSession(base_url=base) as http:
            resp = await http.post(
                "/api/v1/auth/register",
                json={"email": email, "password": password, "name": "Eve"},
                headers={"X-Request-ID": "e2e-register-1"},
            )
            assert resp.status == 201, await resp.text()
            assert resp.headers["X-Request-ID"] == "e2e-register-1"
            first = await resp.json()

            # API -> outbox -> relay -> fakeredis broker -> worker thread -> real SMTP.
            [message] = await smtp.wait_for(1, timeout=30)
            assert message["To"] == email
            assert message["Subject"] == "Welcome to Task Manager"

            resp = await http.post(
                "/api/v1/auth/login", json={"email": email, "password": password}
            )
            assert resp.status == 200, await resp.text()
            second = await resp.json()

            resp = await http.post(
                "/api/v1/auth/refresh", json={"refresh_token": second["refresh_token"]}
            )
            assert resp.status == 200, await resp.text()
            rotated = await resp.json()
            assert rotated["refresh_token"] != second["refresh_token"]

            # The rotated-away token is now a replay: refused, and the whole login revoked.
            resp = await http.post(
                "/api/v1/auth/refresh", json={"refresh_token": second["refresh_token"]}
            )
            assert resp.status == 401
            assert resp.content_type == "application/problem+json"
            resp = await http.get(
                "/api/v1/me", headers={"Authorization": f"Bearer {rotated['access_token']}"}
            )
            assert resp.status == 401

            # The registration's own login is unaffected until it logs out.
            auth = {"Authorization": f"Bearer {first['access_token']}"}
            resp = await http.get("/api/v1/me", headers=auth)
            assert resp.status == 200
            assert (await resp.json())["email"] == email
            resp = await http.post("/api/v1/auth/logout", headers=auth)
            assert resp.status == 204
            resp = await http.get("/api/v1/me", headers=auth)
            assert resp.status == 401

        # The worker thread logged the delivery under the registering request's id.
        await wait_until(
            lambda: any(
                line.get("event") == "mail.sent" and line.get("request_id") == "e2e-register-1"
                for line in _json_lines(proc.output())
            ),
            timeout=10,
            what="the mail.sent log line",
            proc=proc,
        )

        code, in_time = proc.stop(signal.SIGTERM, grace=30)
        assert in_time, f"did not exit within 30 s of SIGTERM\n{proc.describe()}"
        assert code == 0, proc.describe()
        # The embedded server is stopped (and reaped) before the parent exits: no orphan.
        assert not pid_alive(child), f"secantusd-py {child} outlived its parent"
        assert not port_open(mongo_port)
        assert not port_open(port)

        lines = proc.output().splitlines()
        logs = [line for line in lines if line.startswith("{")]
        # Everything but the start-up banner is a JSON log line, libraries' lines included.
        plain = [line for line in lines if line.strip() and not line.startswith("{")]
        assert plain[0].startswith("taskmanager run"), plain
        assert all(line.startswith("  ") for line in plain[1:]), plain
        access = [
            json.loads(line)
            for line in logs
            if '"http.request"' in line and "/api/v1/auth/register" in line
        ]
        assert [a["request_id"] for a in access] == ["e2e-register-1"]
    finally:
        proc.close()


async def test_sigterm_during_startup_leaves_no_orphan(
    run_env: dict[str, str], workdir: str
) -> None:
    """A TERM while the embedded server is still starting must stop it too."""
    port = free_port()
    proc = start(["run", "--memory", "--port", str(port)], run_env, cwd=workdir)
    child: int | None = None
    try:
        deadline = time.monotonic() + 30
        while child is None:
            found = [pid for pid in proc.children() if "secantusd" in " ".join(cmdline(pid))]
            if found:
                child = found[0]
            elif time.monotonic() > deadline or proc.popen.poll() is not None:
                raise AssertionError(f"no secantusd-py child appeared\n{proc.describe()}")
            else:
                time.sleep(0.01)
        assert not port_open(port), "already serving: the start-up window was missed"
        _, in_time = proc.stop(signal.SIGTERM, grace=30)
        assert in_time, proc.describe()
        assert not pid_alive(child), f"secantusd-py {child} outlived its parent\n{proc.describe()}"
    finally:
        proc.close()
