"""``taskmanager web --processes N`` (issue 11): N real web processes on one loopback port
under a supervisor, over the suite's MongoDB and Redis.

Which child served what is read from the children themselves, not from their answers: the
sockets each child holds (``/proc/<pid>/fd`` against the listening sockets of
``/proc/net/tcp``) and the metric files each child writes in the group's directory
(prometheus_client's multiprocess mode names them by pid).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from cli.embedded import free_port
from config.settings import Settings
from tests.cli.conftest import invoke
from tests.e2e.helpers import Proc, deployed_env, pid_alive, start, wait_http, wait_until
from web.group import DIR_PREFIX

pytestmark = pytest.mark.timeout(120)

SECRET = "web-processes-" + "k" * 30
#: Requests sent in the metrics test, each on a connection of its own.
K = 40


def _env(settings: Settings, metrics_base: Path | None = None) -> dict[str, str]:
    extra = {"PROMETHEUS_MULTIPROC_DIR": str(metrics_base)} if metrics_base else {}
    return deployed_env(settings, JWT_SECRET=SECRET, **extra)


def _listening_inodes(port: int) -> set[str]:
    """Inodes of the sockets listening on ``port`` (any address, IPv4 and IPv6)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(inode)
    return inodes


def _listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a socket listening on ``port``."""
    inodes = _listening_inodes(port)
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False


async def _children_listening(proc: Proc, port: int, count: int, timeout: float = 60) -> list[int]:
    """Wait until ``proc`` has ``count`` children, each listening on ``port``; their pids."""
    await wait_until(
        lambda: (
            len(proc.children()) == count and all(_listens(pid, port) for pid in proc.children())
        ),
        timeout=timeout,
        what=f"{count} children listening on {port}",
        proc=proc,
    )
    return proc.children()


def _healthz_count(families: Any) -> float:
    return sum(
        sample.value
        for family in families
        for sample in family.samples
        if sample.name == "http_requests_total" and sample.labels.get("route") == "/healthz"
    )


def _answered_by(directory: Path, pid: int) -> float:
    """``/healthz`` requests that child ``pid`` counted (its own counter file)."""
    path = directory / f"counter_{pid}.db"
    if not path.exists():
        return 0.0
    return _healthz_count(MultiProcessCollector.merge([str(path)], accumulate=True))


async def _scrape(base: str) -> dict[str, float]:
    """One ``/metrics`` scrape, on a connection of its own: the sums we look at."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.get(f"{base}/metrics") as resp,
    ):
        assert resp.status == 200, await resp.text()
        text = await resp.text()
    families = list(text_string_to_metric_families(text))
    up = [s.value for f in families for s in f.samples if s.name == "taskmanager_queue_stats_up"]
    return {
        "healthz": _healthz_count(families),
        "queue_stats_up": sum(up),
        "process_families": float(sum(f.name.startswith("process_") for f in families)),
    }


def test_processes_must_be_at_least_one(cli_env: Settings) -> None:
    result = invoke("web", "--processes", "0")
    assert result.exit_code == 2
    assert "--processes" in result.output and "0" in result.output


async def test_two_processes_share_the_port_and_their_metrics(
    make_settings: Any, tmp_path: Path
) -> None:
    settings = make_settings()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    web = start(
        ["web", "--port", str(port), "--processes", "2"],
        _env(settings, tmp_path),
        cwd=str(tmp_path),
    )
    try:
        await wait_http(web, f"{base}/readyz", timeout=60)
        children = await _children_listening(web, port, 2)
        assert not _listens(web.pid, port), "the parent must not serve"
        directory = tmp_path / f"{DIR_PREFIX}{web.pid}"
        assert directory.is_dir()

        # Each request on a new connection: the kernel spreads them over the children.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http:
            for _ in range(K):
                async with http.get(f"{base}/healthz") as resp:
                    assert resp.status == 200
        by_child = {pid: _answered_by(directory, pid) for pid in children}
        assert all(n > 0 for n in by_child.values()), f"a child served nothing: {by_child}"
        assert sum(by_child.values()) == K, by_child

        # Whichever child answers a scrape serves the group's totals, and the queue gauges
        # once (the group holds the exporter lease in its name).
        for _ in range(6):
            scraped = await _scrape(base)
            assert scraped["healthz"] >= K, scraped
            assert scraped["queue_stats_up"] == 1, scraped
            assert scraped["process_families"] == 0, scraped  # per-child: left out

        code, in_time = await asyncio.to_thread(web.stop, signal.SIGTERM, 60)
        assert in_time and code == 0, web.describe()
        assert not [pid for pid in children if pid_alive(pid)], "orphaned children"
        assert not directory.exists(), "the metrics directory is removed at the end"
    finally:
        web.close()


async def test_a_killed_child_is_restarted(make_settings: Any, tmp_path: Path) -> None:
    settings = make_settings()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    web = start(
        ["web", "--port", str(port), "--processes", "2"],
        _env(settings, tmp_path),
        cwd=str(tmp_path),
    )
    try:
        await wait_http(web, f"{base}/readyz", timeout=60)
        first, second = await _children_listening(web, port, 2)
        os.kill(first, signal.SIGKILL)
        killed_at = time.monotonic()
        await wait_until(
            lambda: first not in web.children() and len(web.children()) == 2,
            timeout=30,
            what="a new child in place of the killed one",
            proc=web,
        )
        children = await _children_listening(web, port, 2)
        assert second in children and first not in children
        assert time.monotonic() - killed_at < 30
        assert '"web.child_exited"' in web.output()
        await wait_http(web, f"{base}/healthz")

        code, in_time = await asyncio.to_thread(web.stop, signal.SIGTERM, 60)
        assert in_time and code == 0, web.describe()
        assert not [pid for pid in children if pid_alive(pid)], "orphaned children"
    finally:
        web.close()


async def test_children_leave_when_the_parent_is_killed(make_settings: Any, tmp_path: Path) -> None:
    """No orphan serves on unsupervised: a child whose parent died drains and exits."""
    settings = make_settings()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    web = start(
        ["web", "--port", str(port), "--processes", "2"],
        _env(settings, tmp_path),
        cwd=str(tmp_path),
    )
    children: list[int] = []
    try:
        await wait_http(web, f"{base}/readyz", timeout=60)
        children += await _children_listening(web, port, 2)
        web.popen.kill()
        assert await asyncio.to_thread(web.popen.wait, 10) == -signal.SIGKILL
        await wait_until(
            lambda: not [pid for pid in children if pid_alive(pid)],
            timeout=30,
            what="the children of a killed parent to exit",
        )
    finally:
        for pid in children:  # re-parented: out of web.close()'s reach
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        web.close()


async def test_one_process_serves_alone(make_settings: Any, tmp_path: Path) -> None:
    """``--processes 1``: no supervisor, no child, no shared metrics (as before)."""
    settings = make_settings()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    web = start(
        ["web", "--port", str(port), "--processes", "1"],
        _env(settings),
        cwd=str(tmp_path),
    )
    try:
        await wait_http(web, f"{base}/readyz", timeout=60)
        assert web.children() == []
        assert _listens(web.pid, port)
        scraped = await _scrape(base)
        assert scraped["process_families"] > 0  # the default registry, as before
        assert not list(tmp_path.glob(f"{DIR_PREFIX}*"))
        code, in_time = await asyncio.to_thread(web.stop, signal.SIGTERM, 60)
        assert in_time and code == 0, web.describe()
    finally:
        web.close()
