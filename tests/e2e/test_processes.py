"""``taskmanager web`` and ``taskmanager worker`` as separate processes over the real MongoDB
(SecantusDB) and Redis servers of the suite, and the start-up refusals of bad configuration."""

from __future__ import annotations

import json
import signal
import subprocess
import uuid
from typing import Any

import aiohttp
import pytest

from cli.embedded import free_port
from config.settings import Settings
from tests.conftest import SmtpSink
from tests.e2e.helpers import (
    Proc,
    clean_env,
    deployed_env,
    pid_alive,
    start,
    taskmanager_exe,
    wait_http,
    wait_until,
)

pytestmark = pytest.mark.timeout(150)

#: A production-grade secret: 40 characters, not a placeholder.
SECRET = "e2e-secret-" + "k" * 29


def _service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """What a deployment would set, from the test's settings (own database and prefix)."""
    return deployed_env(settings, JWT_SECRET=SECRET, **extra)


def _logged(proc: Proc, event: str) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in proc.output().splitlines() if x.startswith("{")]
    return [line for line in lines if line.get("event") == event]


async def test_separate_web_and_worker_processes_deliver_the_welcome_email(
    make_settings: Any, smtp: SmtpSink, tmp_path: Any
) -> None:
    """API -> outbox -> relay (web process) -> Redis broker -> worker process -> SMTP."""
    settings = make_settings()  # its database and Redis prefix are removed after the test
    env = _service_env(settings, SMTP_URL=smtp.url)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    web = start(["web", "--port", str(port)], env, cwd=str(tmp_path))
    worker = start(["worker", "--processes", "1", "--threads", "2"], env, cwd=str(tmp_path))
    try:
        await wait_http(web, f"{base}/readyz")
        email = f"proc-{uuid.uuid4().hex[:8]}@example.com"
        async with aiohttp.ClientSession(base_url=base) as http:
            resp = await http.post(
                "/api/v1/auth/register",
                json={"email": email, "password": "correct horse 1", "name": "Pat"},
                headers={"X-Request-ID": "proc-register-1"},
            )
            assert resp.status == 201, await resp.text()
        try:
            [message] = await smtp.wait_for(1, timeout=45)
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}\n--- web\n{web.describe()}\n--- worker\n{worker.describe()}"
            ) from None
        assert message["To"] == email
        assert "Hello Pat" in message.get_payload()

        # The actor ran in the worker process, under the request's id; not in the web one.
        await wait_until(
            lambda: bool(_logged(worker, "mail.sent")), timeout=15, what="mail.sent", proc=worker
        )
        [sent] = _logged(worker, "mail.sent")
        assert sent["request_id"] == "proc-register-1"
        assert sent["process"] == "worker"
        assert not _logged(web, "mail.sent")

        worker_children = worker.children()
        assert worker_children, "dramatiq should run its worker in a child process"
        for proc in (web, worker):
            code, in_time = proc.stop(signal.SIGTERM, grace=30)
            assert in_time, f"did not stop within 30 s of SIGTERM\n{proc.describe()}"
            assert code == 0, proc.describe()
        assert not [pid for pid in worker_children if pid_alive(pid)]
    finally:
        for proc in (web, worker):
            proc.close()


def _refused(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a command that must exit by itself (a bounded wait: it must not start serving)."""
    return subprocess.run(
        [taskmanager_exe(), *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


COMMANDS = [pytest.param(["web"], id="web"), pytest.param(["worker", "-p", "1"], id="worker")]


@pytest.mark.parametrize("command", COMMANDS)
def test_placeholder_secret_is_refused_in_production(
    command: list[str], mongo_url: str, redis_url: str
) -> None:
    env = clean_env(
        APP_ENV="production", JWT_SECRET="change-me", MONGODB_URL=mongo_url, REDIS_URL=redis_url
    )
    result = _refused(command, env)
    assert result.returncode != 0
    assert "JWT_SECRET" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("missing", ["MONGODB_URL", "REDIS_URL"])
def test_missing_service_url_is_refused(
    command: list[str], missing: str, mongo_url: str, redis_url: str
) -> None:
    values = {"MONGODB_URL": mongo_url, "REDIS_URL": redis_url}
    del values[missing]
    env = clean_env(APP_ENV="production", JWT_SECRET=SECRET, **values)
    result = _refused(command, env)
    assert result.returncode != 0
    assert missing in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
