"""``taskmanager web --processes N``: N web processes on one port under a supervisor, as
PM2's cluster mode (``cli/processes.py`` ``web``).

The parent loads and checks the settings, checks the port, then re-executes
``taskmanager web --processes 1`` N times: each child is an ordinary single-process web
server (app, outbox relay, graceful drain: ``web/app.py`` ``serve``) that binds the port with
``SO_REUSEPORT``, so the kernel (Linux) spreads new connections over the children. The
parent runs no event loop and no app; it

- restarts a child that exits while the group runs, after :data:`RESTART_BACKOFF` seconds,
  doubled for each time in a row that its slot's process exited within :data:`MIN_UPTIME`
  seconds of its start (at most :data:`MAX_BACKOFF`). A slot whose process exits that early
  more than :data:`MAX_RESTARTS` times in a row is crash-looping (a bad configuration, a
  database away at start-up): the group stops and exits 1, so whatever runs it (Kubernetes,
  systemd, compose) sees it. So a slot restarts at most about five times a minute;
- passes SIGTERM and SIGINT on to every child, waits for all of them (each drains as a single
  process does; at most :data:`STOP_TIMEOUT` seconds, then KILL), and exits 0 when each
  stopped cleanly (1 otherwise);
- keeps the group's metrics directory (``web/group.py``): made empty at start, a child's live
  gauges removed when it exits, removed at the end.

A child notices when its parent is gone (killed with SIGKILL, say) and drains and exits
rather than serve on unsupervised.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import click
from aiohttp import web

from config.logging import get_logger
from config.settings import Settings
from web import group

log = get_logger(__name__)

#: Seconds before a child that exited is started again (doubled per early exit in a row).
RESTART_BACKOFF = 1.0
MAX_BACKOFF = 10.0
#: A process that exits within this many seconds of its start exited early; a slot whose
#: process exits early more than :data:`MAX_RESTARTS` times in a row stops the group.
MIN_UPTIME = 60.0
MAX_RESTARTS = 5
#: How long the children may take to drain after SIGTERM before they are killed (seconds):
#: a child's drain (2 s), requests under way (15 s) and clean-ups (the relay's 10 s) fit.
STOP_TIMEOUT = 60.0
#: How often the parent looks at its children, and a child at its parent (seconds).
POLL = 0.1
PARENT_POLL = 1.0
SIGNALS = (signal.SIGTERM, signal.SIGINT)
_CGROUP_ROOT = Path("/sys/fs/cgroup")


# -- how many ----------------------------------------------------------------------------------


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity (``os.process_cpu_count`` where
    Python has it), at most the CPU limit of its cgroups rounded up (a container's
    ``--cpus``, a pod's ``limits.cpu``): one process per core of a 64-core node would
    oversubscribe a pod limited to half a core."""
    counter = getattr(os, "process_cpu_count", None)
    if counter is not None:
        cores = int(counter() or 1)
    elif hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, math.ceil(limit))
    return max(1, cores)


def cgroup_cpu_limit() -> float | None:
    """The CPU limit (in cores) the cgroups of this process and their ancestors set, None
    when none does (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``)."""
    try:
        entries = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for entry in entries:
        parts = entry.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        read: Callable[[Path], float | None]
        if controllers == "":
            base, read = _CGROUP_ROOT, _v2_limit
        elif "cpu" in controllers.split(","):
            base, read = _CGROUP_ROOT / controllers, _v1_limit
            if not base.is_dir():
                base = _CGROUP_ROOT / "cpu"
        else:
            continue
        # In a container the path is often the host's: walk up to the mount's root.
        here = base / path.strip().lstrip("/")
        while True:
            limit = read(here)
            if limit is not None:
                limits.append(limit)
            if here == base or base not in here.parents:
                break
            here = here.parent
    return min(limits, default=None)


def _v2_limit(directory: Path) -> float | None:
    try:
        quota, period = (directory / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _v1_limit(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def check_port(host: str, port: int) -> None:
    """Refuse, readably, a port that another process holds without ``SO_REUSEPORT`` (the
    children would each fail to bind it): bind a socket as they will, then close it."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise click.ClickException("--processes above 1 needs SO_REUSEPORT (Linux, BSD, macOS)")
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise click.ClickException(f"HOST {host!r} does not resolve: {exc}") from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise click.ClickException(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from exc


# -- the parent --------------------------------------------------------------------------------


@dataclass
class Child:
    """One slot of the group and the process serving in it now (None while it waits for its
    restart, due at ``due``)."""

    index: int
    popen: subprocess.Popen[bytes] | None = None
    #: Whether the stop signal was passed to this process.
    signalled: bool = False
    #: When (monotonic) this process was started.
    started: float = 0.0
    #: How many processes of this slot in a row exited early (see :data:`MIN_UPTIME`).
    early_exits: int = 0
    due: float = 0.0


class Supervisor:
    """Starts, restarts and stops the children (see the module's docstring)."""

    def __init__(self, count: int, argv: list[str], env: dict[str, str], directory: Path):
        self.argv = argv
        self.env = env
        self.directory = directory
        self.children = [Child(i) for i in range(count)]
        #: The first stop signal received (None while the group runs).
        self.stopping: int | None = None

    def run(self) -> int:
        """Serve until a stop signal or a crash loop; the exit code."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in SIGNALS}
        try:
            for child in self.children:
                if self.stopping is None:
                    self._start(child)
            while self.stopping is None:
                now = time.monotonic()
                for child in self.children:
                    if self.stopping is not None:
                        break
                    if child.popen is None:
                        if now >= child.due:
                            self._start(child)
                        continue
                    code = child.popen.poll()
                    if code is not None and not self._exited(child, code, now):
                        self._on_signal(signal.SIGTERM, None)
                        self._stop_all()
                        return 1
                time.sleep(POLL)
            return self._stop_all()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            shutil.rmtree(self.directory, ignore_errors=True)

    def _start(self, child: Child) -> None:
        child.popen = subprocess.Popen(self.argv, env=self.env)
        child.signalled = False
        child.started = time.monotonic()
        log.info("web.child_started", index=child.index, pid=child.popen.pid)

    def _exited(self, child: Child, code: int, now: float) -> bool:
        """Schedule the restart of a child that exited; False when it is crash-looping."""
        assert child.popen is not None
        pid = child.popen.pid
        child.popen = None
        group.child_gone(pid, self.directory)
        early = now - child.started < MIN_UPTIME
        child.early_exits = child.early_exits + 1 if early else 0
        if child.early_exits > MAX_RESTARTS:
            log.error(
                "web.child_crash_loop",
                index=child.index,
                pid=pid,
                exit_code=code,
                early_exits=child.early_exits,
                action="stopping the group",
            )
            return False
        delay = min(MAX_BACKOFF, RESTART_BACKOFF * 2 ** max(0, child.early_exits - 1))
        child.due = now + delay
        log.warning(
            "web.child_exited", index=child.index, pid=pid, exit_code=code, restart_in=delay
        )
        return True

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Pass the signal on to every child (a second one too: as a single process, a child
        told twice stops at once once its drain is over)."""
        if self.stopping is None:
            self.stopping = signum
        for child in self.children:
            if child.popen is not None:
                child.popen.send_signal(signum)
                child.signalled = True

    def _stop_all(self) -> int:
        """Wait for every child to stop (passing the stop signal to those started after it
        arrived); 0 when each stopped cleanly."""
        assert self.stopping is not None
        log.info("web.group_stopping", signal=signal.Signals(self.stopping).name)
        for child in self.children:
            if child.popen is not None and not child.signalled:
                child.popen.send_signal(self.stopping)
                child.signalled = True
        deadline = time.monotonic() + STOP_TIMEOUT
        clean = True
        for child in self.children:
            if child.popen is None:
                continue
            pid = child.popen.pid
            try:
                code = child.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.popen.kill()
                code = child.popen.wait()
                log.error("web.child_killed", index=child.index, pid=pid, after=STOP_TIMEOUT)
            # Killed by the signal before it could handle it (still starting): nothing to drain.
            if code not in (0, -signal.SIGTERM, -signal.SIGINT):
                clean = False
                log.error("web.child_failed", index=child.index, pid=pid, exit_code=code)
            group.child_gone(pid, self.directory)
            child.popen = None
        log.info("web.group_stopped", clean=clean)
        return 0 if clean else 1


def supervise(settings: Settings, port: int, count: int) -> int:
    """Run ``count`` web processes on ``settings.host:port``; the exit code."""
    check_port(settings.host, port)
    directory = group.make_group_dir(os.getpid())
    env = {k: v for k, v in os.environ.items() if k != "prometheus_multiproc_dir"}
    env[group.GROUP_ENV] = f"{os.getpid()}:{secrets.token_hex(6)}"
    env[group.MULTIPROC_ENV] = str(directory)
    # As the parent resolved them (the root group's --mongodb-url/--redis-url included).
    for name, value in (("MONGODB_URL", settings.mongodb_url), ("REDIS_URL", settings.redis_url)):
        if value:
            env[name] = value
    argv = [sys.executable, "-m", "cli.main", "web", "--port", str(port), "--processes", "1"]
    log.info(
        "web.group_starting",
        processes=count,
        host=settings.host,
        port=port,
        metrics_dir=str(directory),
    )
    return Supervisor(count, argv, env, directory).run()


# -- a child -----------------------------------------------------------------------------------


def leave_with_parent(
    parent: int,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A clean-up context for a child's app: once ``parent`` is no longer its parent (it
    died and the child was re-parented), the child sends itself SIGTERM: it drains and exits
    (``web.app.serve``) instead of serving on unsupervised."""

    async def watch() -> None:
        # Polled: no event tells a process that its parent died (short of prctl).
        while os.getppid() == parent:  # noqa: ASYNC110
            await asyncio.sleep(PARENT_POLL)
        log.warning("web.parent_gone", parent=parent)
        os.kill(os.getpid(), signal.SIGTERM)

    async def context(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(watch(), name="web-parent-watch")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return context
