"""Running ``taskmanager`` as real processes: start, wait for HTTP, stop, inspect output.

Every wait is bounded, and every failure message carries the process's output.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import aiohttp

from config.settings import Settings
from tests.conftest import service_vars

#: Environment variables the product reads; stripped from the inherited environment so a
#: developer's shell (e.g. MONGODB_URL for the suite) cannot leak into a process under test.
PRODUCT_VARS = frozenset(name.upper() for name in Settings.model_fields)


def taskmanager_exe() -> str:
    """The console script of this virtualenv (beside the running interpreter)."""
    return str(Path(sys.executable).with_name("taskmanager"))


def clean_env(**values: str) -> dict[str, str]:
    """The inherited environment minus every product variable, plus ``values``."""
    env = {k: v for k, v in os.environ.items() if k.upper() not in PRODUCT_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    # One process per `taskmanager web` (measured and signalled as one) unless asked.
    env["WEB_PROCESSES"] = "1"
    env.update(values)
    return env


def process_env(settings: Settings, **values: str) -> dict[str, str]:
    """A clean environment pointing a process at the test's database, Redis prefix and JWT
    secret (those of ``settings``), plus ``values``, which win."""
    return clean_env(**{**service_vars(settings), **values})


def deployed_env(settings: Settings, **values: str) -> dict[str, str]:
    """:func:`process_env` as a deployment runs: ``APP_ENV=production``, JSON logs, listening
    on loopback; plus ``values``, which win."""
    return process_env(
        settings, **{"APP_ENV": "production", "LOG_FORMAT": "json", "HOST": "127.0.0.1", **values}
    )


class Proc:
    """A child process whose stdout and stderr go to one temporary file."""

    def __init__(self, args: list[str], env: Mapping[str, str], *, cwd: str | None = None):
        self.args = args
        self._out: IO[bytes] = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix="tm-e2e-", suffix=".log", delete=False
        )
        self.log_path = Path(self._out.name)
        self._seen: dict[int, str] = {}
        self.popen = subprocess.Popen(
            args, env=dict(env), cwd=cwd, stdout=self._out, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        """The process id."""
        return self.popen.pid

    def output(self) -> str:
        """Everything the process wrote so far."""
        self._out.flush()
        return self.log_path.read_text(errors="replace")

    def describe(self) -> str:
        """Command, exit state and output, for assertion messages."""
        state = self.popen.poll()
        return (
            f"$ {' '.join(self.args)}\n"
            f"[{'running' if state is None else f'exited with {state}'}]\n{self.output()}"
        )

    def children(self) -> list[int]:
        """Pids of the process's direct children (Linux ``/proc``)."""
        return children_of(self.pid)

    def descendants(self) -> list[int]:
        """Pids of the children, their children, and so on."""
        found: list[int] = []
        todo = children_of(self.pid)
        while todo:
            pid = todo.pop()
            if pid not in found:
                found.append(pid)
                todo += children_of(pid)
        return found

    def stop(self, sig: int = signal.SIGTERM, grace: float = 30.0) -> tuple[int, bool]:
        """Send ``sig`` and wait up to ``grace`` seconds, then KILL.

        Returns the exit code and whether the process exited within the grace period.
        """
        if self.popen.poll() is not None:
            return self.popen.returncode, True
        # Remembered for close(): a dead parent's children are re-parented out of reach.
        self._remember_descendants()
        self.popen.send_signal(sig)
        try:
            return self.popen.wait(grace), True
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait(10), False

    def close(self, grace: float = 20.0) -> None:
        """Clean-up after the test: stop the process (TERM, then KILL) and KILL anything it
        started that is still running; delete its output file."""
        self._remember_descendants()
        self.stop(signal.SIGTERM, grace=grace)
        for pid, started in self._seen.items():
            if _start_time(pid) == started:  # the same process, not a reused pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._out.close()
        self.log_path.unlink(missing_ok=True)

    def _remember_descendants(self) -> None:
        for pid in self.descendants():
            started = _start_time(pid)
            if started is not None:
                self._seen.setdefault(pid, started)


def children_of(pid: int) -> list[int]:
    """Pids of the direct children of ``pid`` (Linux ``/proc``)."""
    pids: set[int] = set()
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            pids.update(int(p) for p in path.read_text().split())
        except OSError:
            continue
    return sorted(pids)


def _start_time(pid: int) -> str | None:
    """The start time of ``pid`` (``/proc/<pid>/stat`` field 22), None when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def start(args: list[str], env: Mapping[str, str], *, cwd: str | None = None) -> Proc:
    """Start ``taskmanager <args>``."""
    return Proc([taskmanager_exe(), *args], env, cwd=cwd)


async def wait_http(proc: Proc, url: str, *, status: int = 200, timeout: float = 30.0) -> None:
    """Poll ``url`` until it answers ``status``; fail early if the process exits."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise AssertionError(f"process exited before {url} answered\n{proc.describe()}")
            try:
                async with session.get(url) as resp:
                    if resp.status == status:
                        return
                    last = f"{resp.status} {await resp.text()}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = repr(exc)
            await asyncio.sleep(0.1)
    raise AssertionError(
        f"{url} did not answer {status} within {timeout}s ({last})\n{proc.describe()}"
    )


async def wait_until(
    predicate: Any, *, timeout: float, what: str, proc: Proc | None = None
) -> None:
    """Poll ``predicate()`` (without blocking the loop) until true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            detail = f"\n{proc.describe()}" if proc is not None else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{detail}")
        await asyncio.sleep(0.05)


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the parenthesised command name, which may itself contain spaces.
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def cmdline(pid: int) -> list[str]:
    """The argv of ``pid`` (empty when it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False
