"""The embedded MongoDB-compatible server (SecantusDB) as a child process.

Used by ``taskmanager run`` when no ``MONGODB_URL`` is set, and by the test suite. SecantusDB
is GPL-2.0: it is only ever *run* (``secantusd-py``), never imported.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


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
        """A connection string for the server."""
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

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
