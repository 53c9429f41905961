"""The load generator: one process holding N keep-alive HTTP/1.1 connections, closed loop.

Run as ``python -m bench.load``; driven over stdin/stdout by :mod:`bench.api` so that several
of them can be started and stepped together:

1. stdin line 1: a JSON config (host, port, connections, requests as latin-1 strings,
   the statuses that count as success, an optional header that each answer must carry);
   the process connects every connection and prints ``ready``.
2. ``go``: every connection starts sending (warm-up: nothing is recorded yet).
3. ``mark``: the measurement window opens.
4. ``stop``: the window closes (once at least one answer arrived) and ``closed`` is printed;
   in-flight requests finish, and one JSON line with the results of the window follows.

It speaks raw HTTP/1.1 over asyncio protocols instead of using aiohttp's client: pre-built
request bytes and a minimal response parser cost several times less CPU per request, so on a
2-core machine the load generator takes as little as possible from the server it measures.
Each connection sends a request, waits for the whole answer, then sends the next (closed loop,
the way wrk and ab count).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import resource
import sys
import time
from array import array
from typing import Any

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[ \t]*chunked", re.IGNORECASE)
_NO_BODY = (204, 304)


class ConnectionLost(Exception):
    """The server closed the connection (or sent something this parser cannot frame)."""


class _Conn(asyncio.Protocol):
    """One keep-alive connection: ``request()`` sends bytes and awaits the full answer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes, bytes]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionLost(repr(exc) if exc else "closed by server"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[: end + 2])
        try:
            status = int(head[9:12])
        except ValueError:
            waiter.set_exception(ConnectionLost(f"bad status line {head[:40]!r}"))
            return
        start = end + 4
        if status in _NO_BODY or 100 <= status < 200:
            size = 0
        else:
            match = _CONTENT_LENGTH.search(head)
            if match is not None:
                size = int(match.group(1))
            elif _CHUNKED.search(head):
                # Rare here (aiohttp sends Content-Length for buffered bodies); the body is
                # only needed whole, so wait for the terminating chunk.
                term = self.buf.find(b"\r\n0\r\n\r\n", start)
                if term < 0:
                    return
                size = term + 7 - start
            else:
                waiter.set_exception(ConnectionLost("answer without a length"))
                return
        if len(self.buf) < start + size:
            return
        body = bytes(self.buf[start : start + size])
        del self.buf[: start + size]
        waiter.set_result((status, head, body))

    async def request(self, data: bytes) -> tuple[int, bytes, bytes]:
        """Send one request and return ``(status, head, body)``."""
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.waiter


class Run:
    """The state one load-generator process keeps while it runs."""

    def __init__(self, config: dict[str, Any]):
        self.host: str = config["host"]
        self.port: int = int(config["port"])
        self.connections: int = int(config["connections"])
        self.requests = [r.encode("latin-1") for r in config["requests"]]
        self.ok = set(config.get("ok", [200]))
        self.expect: bytes | None = (
            config["expect_header"].encode("latin-1").lower()
            if config.get("expect_header")
            else None
        )
        self.seed = int(config.get("seed", 0))
        self.recording = False
        self.stopping = False
        self.latencies = array("d")
        self.errors: dict[str, int] = {}
        self.error_sample: str | None = None
        self.sent = 0
        self.conns: list[_Conn] = []

    async def connect(self) -> None:
        """Open every connection (before any request, so connecting is not measured)."""
        loop = asyncio.get_running_loop()
        for _ in range(self.connections):
            _, proto = await loop.create_connection(_Conn, self.host, self.port)
            self.conns.append(proto)

    def _error(self, kind: str, sample: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if self.error_sample is None:
            self.error_sample = sample[:400]

    async def drive(self, index: int, conn: _Conn) -> None:
        """Send requests on one connection until stopped."""
        rng = random.Random(self.seed * 1000 + index)
        reqs = self.requests
        n = len(reqs)
        i = rng.randrange(n)
        step = 1 if n == 1 else rng.choice([k for k in range(1, n) if _coprime(k, n)] or [1])
        perf = time.perf_counter
        record = self.latencies.append
        while not self.stopping:
            data = reqs[i]
            i = (i + step) % n
            started = perf()
            try:
                status, head, body = await conn.request(data)
            except ConnectionLost as exc:
                if self.recording:
                    self._error("connection", str(exc))
                return
            elapsed = perf() - started
            if not self.recording:
                continue
            self.sent += 1
            if status not in self.ok:
                self._error(str(status), f"{status} {body[:300].decode('utf-8', 'replace')}")
            elif self.expect is not None and self.expect not in head.lower():
                self._error("header", f"missing {self.expect!r} in {head[:300]!r}")
            else:
                record(elapsed * 1000.0)
            if self.stopping:
                return


def _coprime(a: int, b: int) -> bool:
    while b:
        a, b = b, a % b
    return a == 1


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def main() -> None:
    """Read the config and commands from stdin, write ``ready`` and the result to stdout."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def command() -> str:
        return (await reader.readline()).decode().strip()

    run = Run(json.loads(await command()))
    await run.connect()
    print("ready", flush=True)
    if await command() != "go":
        return
    tasks = [asyncio.create_task(run.drive(i, c)) for i, c in enumerate(run.conns)]
    if await command() != "mark":
        return
    run.recording = True
    t0, cpu0 = time.perf_counter(), _cpu()
    await command()  # stop
    # A window with no answer at all says nothing: on a starved machine, keep it open until
    # the first answer (bounded), so the rate is still answers / elapsed time.
    deadline = time.perf_counter() + 30
    while run.sent == 0 and time.perf_counter() < deadline:
        await asyncio.sleep(0.005)
    window, cpu = time.perf_counter() - t0, _cpu() - cpu0
    run.recording = False  # answers arriving after the window closed are not counted
    print("closed", flush=True)
    run.stopping = True
    _, pending = await asyncio.wait(tasks, timeout=30)
    for task in pending:
        task.cancel()
    for conn in run.conns:
        if conn.transport is not None:
            conn.transport.close()
    result = {
        "ok": len(run.latencies),
        "sent": run.sent,
        "window": window,
        "cpu": cpu,
        "errors": run.errors,
        "error_sample": run.error_sample,
        "latencies_ms": [round(x, 4) for x in run.latencies],
    }
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main())
