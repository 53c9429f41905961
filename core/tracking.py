"""Redis server-assisted client-side caching for :mod:`core.local_cache`: one connection in
RESP3 with ``CLIENT TRACKING ON BCAST`` on the key prefixes the L1 copies, whose pushes name
every such key any client changes.

A plain :class:`asyncio.Protocol` rather than a redis-py client, on purpose: its
``data_received`` runs in the event-loop turn that reads the socket, before any request read in
the same turn reaches its handler, which is what the L1's no-stale-read argument needs (a
redis-py reader task would wake a turn later, racing the handlers). The RESP3 subset parsed here
is what these few commands answer and push.

The tracker keeps itself honest: it ``PING``s every :data:`HEARTBEAT` seconds and, if a pong
is later than :data:`HEARTBEAT_TIMEOUT`, or the connection closes, or anything unexpected
arrives, it disarms the cache and reconnects with backoff; the cache itself stops answering
when no pong came for :data:`HEARTBEAT` + :data:`HEARTBEAT_TIMEOUT` seconds, even if the event
loop was too busy to notice. Redis 6.0 or newer is needed; a server that refuses ``HELLO 3`` or
tracking leaves the cache disarmed, logged once. Broadcast prefixes match keys in every
database, so the URL's database number needs no ``SELECT``; ``rediss://`` verifies the server
with the system's certificate authorities.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from contextlib import suppress
from typing import Any

from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url

from config.logging import get_logger
from core import cancel
from core.local_cache import LOCAL_PUSHES, LocalCache

log = get_logger(__name__)

HEARTBEAT = 0.5
HEARTBEAT_TIMEOUT = 2.0
CONNECT_TIMEOUT = 2.0
BACKOFF_MAX = 5.0


class RespError(Exception):
    """A ``-ERR`` reply or bytes that are not RESP3."""


class _Incomplete(Exception):
    pass


def parse(buf: bytes | bytearray, pos: int = 0) -> tuple[Any, int]:
    """One RESP3 value from ``buf`` at ``pos``: ``(value, next position)``. Raises
    ``_Incomplete`` when more bytes are needed. Pushes come back as ``("push", [...])``,
    errors as :class:`RespError` values (not raised), maps as lists of pairs."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind, line, pos = buf[pos : pos + 1], bytes(buf[pos + 1 : end]), end + 2
    if kind in (b"+",):
        return line.decode(), pos
    if kind in (b"-", b"!"):
        if kind == b"!":
            return _blob(buf, int(line), pos, RespError)
        return RespError(line.decode()), pos
    if kind in (b":", b"(", b","):
        return (float(line) if kind == b"," else int(line)), pos
    if kind == b"#":
        return line == b"t", pos
    if kind == b"_":
        return None, pos
    if kind in (b"$", b"="):
        if line == b"-1":
            return None, pos
        return _blob(buf, int(line), pos, bytes)
    if kind in (b"*", b">", b"~", b"%", b"|"):
        if line == b"-1":
            return None, pos
        count = int(line) * (2 if kind in (b"%", b"|") else 1)
        items = []
        for _ in range(count):
            item, pos = parse(buf, pos)
            items.append(item)
        if kind == b"|":  # an attribute precedes the value it describes: skip it
            return parse(buf, pos)
        if kind == b">":
            return ("push", items), pos
        return items, pos
    raise RespError(f"not RESP3: {bytes(buf[pos - len(line) - 3 : pos])!r}")


def _blob(buf: bytes | bytearray, size: int, pos: int, kind: Any) -> tuple[Any, int]:
    if len(buf) < pos + size + 2:
        raise _Incomplete
    data = bytes(buf[pos : pos + size])
    return (kind(data.decode()) if kind is RespError else data), pos + size + 2


def command(*args: str | bytes) -> bytes:
    """One command in RESP (an array of bulk strings)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg.encode() if isinstance(arg, str) else arg
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


class _Protocol(asyncio.Protocol):
    def __init__(self, tracker: Tracker):
        self.tracker = tracker
        self.buf = bytearray()
        self.replies: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        pos = 0
        try:
            while pos < len(self.buf):
                value, pos = parse(self.buf, pos)
                self._dispatch(value)
        except _Incomplete:
            pass
        except (RespError, ValueError) as exc:
            self.fail(exc)
            return
        del self.buf[:pos]

    def _dispatch(self, value: Any) -> None:
        if isinstance(value, tuple) and value[0] == "push":
            items = value[1]
            if items and items[0] == b"invalidate":
                LOCAL_PUSHES.inc()
                keys = items[1]
                self.tracker.cache.invalidate(None if keys is None else [k.decode() for k in keys])
            return
        if not self.replies:
            self.fail(RespError(f"a reply nobody asked for: {value!r}"))
            return
        waiter = self.replies.popleft()
        if not waiter.done():
            waiter.set_result(value)

    def send(self, *args: str | bytes) -> asyncio.Future[Any]:
        if self.closed.done():
            raise ConnectionError("tracking connection closed")
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.replies.append(waiter)
        assert self.transport is not None
        self.transport.write(command(*args))
        return waiter

    def fail(self, exc: BaseException) -> None:
        self.tracker.cache.disarm()
        if self.transport is not None:
            self.transport.abort()
        self._close(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.tracker.cache.disarm()
        self._close(exc or ConnectionError("Redis closed the tracking connection"))

    def _close(self, exc: BaseException) -> None:
        for waiter in self.replies:
            if not waiter.done():
                waiter.set_exception(ConnectionError(str(exc)))
        self.replies.clear()
        if not self.closed.done():
            self.closed.set_result(None)


class Tracker:
    """Keeps ``cache`` armed while a tracking connection to ``url`` is healthy."""

    def __init__(
        self, url: str, prefixes: list[str], cache: LocalCache, name: str = "taskmanager-tracker"
    ):
        self.url = url
        self.name = name
        self.prefixes = prefixes
        self.cache = cache
        self._task: asyncio.Task[None] | None = None
        self._warned = False
        self._stopping = False
        #: The last session armed the cache: the next failure retries from the shortest wait.
        self._was_armed = False

    def start(self) -> None:
        """Run in the background until :meth:`stop`."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="redis-tracker")

    async def stop(self) -> None:
        """Stop and disarm the cache."""
        self._stopping = True
        if self._task is not None:
            await cancel.stop(self._task, 5)
        self.cache.disarm()

    async def _run(self) -> None:
        backoff = 0.1
        while not self._stopping:
            try:
                await self._session()
                backoff = 0.1
            except Exception as exc:  # any failure: disarmed, logged once, retried
                self.cache.disarm()
                if self._was_armed:
                    backoff, self._was_armed = 0.1, False
                if not self._warned:
                    log.warning("local_cache.tracker_down", error=repr(exc))
                    self._warned = True
            await asyncio.sleep(backoff)
            backoff = min(BACKOFF_MAX, backoff * 2)

    async def _session(self) -> None:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # arrives as its awaitable completes, and stop() would wait for ever.
        async with asyncio.timeout(CONNECT_TIMEOUT):
            proto = await self._connect()
        try:
            hello: list[str | bytes] = ["HELLO", "3"]
            params = self._params
            if params.get("password"):
                hello += ["AUTH", params.get("username") or "default", params["password"]]
            hello += ["SETNAME", self.name]  # CLIENT LIST names it for operators
            await self._expect(proto, hello, None)
            tracking: list[str | bytes] = ["CLIENT", "TRACKING", "ON", "BCAST"]
            for prefix in self.prefixes:
                tracking += ["PREFIX", prefix]
            await self._expect(proto, tracking, "OK")
            self.cache.arm(HEARTBEAT + HEARTBEAT_TIMEOUT)
            self._was_armed = True
            if self._warned:
                log.info("local_cache.tracker_up")
                self._warned = False
            while not self._stopping:
                async with asyncio.timeout(HEARTBEAT_TIMEOUT):
                    await proto.send("PING")
                self.cache.alive(HEARTBEAT + HEARTBEAT_TIMEOUT)
                with suppress(TimeoutError):
                    async with asyncio.timeout(HEARTBEAT):
                        await asyncio.shield(proto.closed)
                if proto.closed.done():
                    raise ConnectionError("tracking connection closed")
        finally:
            self.cache.disarm()
            if proto.transport is not None:
                proto.transport.abort()

    async def _expect(self, proto: _Protocol, args: list[str | bytes], want: Any) -> None:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            reply = await proto.send(*args)
        if isinstance(reply, RespError) or (want is not None and reply != want):
            raise RespError(f"{args[0]!s} {args[1]!s}: {reply!r}")

    @property
    def _params(self) -> dict[str, Any]:
        return dict(parse_url(self.url))

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        params = self._params
        cls = params.get("connection_class")
        proto = _Protocol(self)
        if cls is UnixDomainSocketConnection:
            await loop.create_unix_connection(lambda: proto, params["path"])
        else:
            context = ssl.create_default_context() if cls is SSLConnection else None
            await loop.create_connection(
                lambda: proto,
                params.get("host", "localhost"),
                params.get("port", 6379),
                ssl=context,
            )
        return proto
