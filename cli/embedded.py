"""Servers run as child processes: the embedded MongoDB-compatible server (SecantusDB) and a
private ``redis-server``.

SecantusDB serves ``taskmanager run`` when no ``MONGODB_URL`` is set, and the test suite and
benchmarks; it is GPL-2.0, so it is only ever *run* (``secantusd-py``), never imported. The
private Redis serves the test suite and benchmarks when none answers, and fault tests that
stop and restart a Redis of their own.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from config.connections import REDIS_PROBE_TIMEOUT, sync_redis


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _executable() -> str:
    beside = Path(sys.executable).with_name("secantusd-py")
    found = str(beside) if beside.exists() else shutil.which("secantusd-py")
    if found is None:
        raise RuntimeError(
            "secantusd-py not found: `pip install -e '.[embedded]'` (make run does it) "
            "or set MONGODB_URL to a MongoDB server"
        )
    return found


class EmbeddedMongo:
    """A running ``secantusd-py`` on a free loopback port."""

    def __init__(
        self, storage: str = ":memory:", *, port: int | None = None, log_path: str | None = None
    ):
        self.storage = storage
        self.port = port or free_port()
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """A connection string for the server, with retryable writes off: SecantusDB's
        bookkeeping of them costs every write milliseconds once it holds 10,000 (9-18x fewer
        writes/s past that: ``python -m bench store``), and on one node on loopback the
        driver's one retry has no other member to go to. A real MongoDB keeps the default."""
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true&retryWrites=false"

    def start(self, timeout: float = 20.0) -> EmbeddedMongo:
        """Start the server and wait until it accepts connections."""
        if self.storage != ":memory:":
            Path(self.storage).mkdir(parents=True, exist_ok=True)
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                _executable(),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--storage-path",
                self.storage,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"secantusd-py exited with {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"secantusd-py did not listen on {self.port} within {timeout}s")

    def stop(self, grace: float = 10.0) -> None:
        """TERM, wait, then KILL (it takes a few seconds to exit on TERM)."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def redis_answers(url: str) -> bool:
    """Whether a Redis server answers PING at ``url`` within ``REDIS_PROBE_TIMEOUT``."""
    client = sync_redis(url, timeout=REDIS_PROBE_TIMEOUT)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


class PrivateRedis:
    """A ``redis-server`` of our own on a free loopback port, keeping nothing on disk."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="tm-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Its URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> PrivateRedis:
        """Start it and wait until it answers."""
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        Path(self.dir).mkdir(parents=True, exist_ok=True)  # restartable after stop()
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not redis_answers(self.url):
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("private redis-server did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Stop it (TERM, then KILL after 10 s) and remove its directory."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
