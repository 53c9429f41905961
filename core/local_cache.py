"""The web process's in-process (L1) cache in front of Redis (L2), kept true by Redis itself.

Every authenticated, rate-limited request asks Redis three things in one round trip
(``core/gate.py``): is the token revoked, may the caller spend one request, and (stats, the
first page of the task list) what are the user's cache generation and cached body. This module
lets the process answer all three itself, with no round trip, when it safely can:

* **Revocation.** A token the gate found not revoked is remembered (its ``jti`` and its login).
* **Cached bodies.** The user's generation and cached entry the gate read are remembered.
* **Rate limit: leases.** The gate takes several requests of the caller's shared budget at
  once and this process hands them out (:class:`Lease`). They are spent from the shared
  bucket *before* they are handed out, so all replicas together never let a caller exceed
  ``RATE_LIMIT``. What a lease costs instead is bounded, documented undershoot:
  a lease lasts :data:`LEASE_SECONDS`; requests of it not used by then are given back to the
  bucket by the caller's next round trip through this process, and at most
  ``lease size - 1`` (≤ :data:`LEASE_MAX`) requests stay taken while the caller is served by
  other replicas. A lease starts at one request and doubles (up to the cap, and to a tenth of
  the policy's limit) only while the caller uses up each lease before it expires, so a
  caller sending a request now and then spends exactly one per round trip, as without leases.
  The ``RateLimit`` field's ``r`` counts the shared remainder when the lease was taken plus
  the lease's unspent requests.

**Why this is never stale after a user's own write.** A :class:`~core.tracking.Tracker`
keeps one connection to Redis in server-assisted client-side caching's broadcast mode
(``CLIENT TRACKING ON BCAST`` on the generation and denylist prefixes): Redis pushes the name
of every such key that any client changes (a write bumps the user's generation; a logout sets
a denylist key). A push drops what it names here. Redis queues the push while it runs the
writer's command, so it leaves Redis no later than the reply that lets the writer acknowledge
the write to its client; that client's next request, to any replica, starts after it. On one
host the push is in this process's socket before the request is; the event loop runs the
tracker's ``data_received`` in the same turn that reads the request, and the handler one turn
later. Across hosts the push would have to be overtaken by a chain of three network hops. Three
nets bound what remains:

* this process's own writes drop their keys here synchronously (:meth:`LocalCache.invalidate`
  from ``core/cache.bump`` and logout), not through Redis;
* an answer is learnt only if no push for its keys arrived while it was in flight (a
  per-key sequence number), so a reply overtaken by a push never resurrects an old value;
* nothing is answered here unless the tracker is connected and has answered a ``PING`` within
  the last :data:`~core.tracking.HEARTBEAT_TIMEOUT` seconds; any doubt (disconnect, a late
  pong, Redis restarted) empties the cache, and an entry is never used after
  :data:`MAX_AGE` seconds.

With fakeredis (the all-in-one default) or ``LOCAL_CACHE=false`` there is no tracker and every
request takes the one round trip.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

#: How long a lease's requests may be handed out (seconds): long enough that a user reading
#: about once a second grows a lease, short enough that the ``RateLimit`` field's count is
#: recent.
LEASE_SECONDS = 5.0
#: The largest lease (requests); also never above a tenth of the policy's limit.
LEASE_MAX = 32
#: The longest an entry is used without being read from Redis again (seconds).
MAX_AGE = 30.0
#: How long a key's last push is remembered; a round trip slower than half of it learns
#: nothing (seconds).
PUSH_MEMORY = 60.0
#: Bounds on what one process keeps: cached bodies (bytes) and tokens known not revoked.
MAX_BYTES = 8 * 1024 * 1024
MAX_TOKENS = 100_000

LOCAL_ADMISSIONS = Counter(
    "local_cache_admissions_total",
    "Authenticated requests admitted in process (hit) or by a Redis round trip (miss)",
    ["result"],
)
LOCAL_PUSHES = Counter("local_cache_pushes_total", "Invalidation pushes received from Redis")
LOCAL_ARMED = Gauge("local_cache_armed", "1 while the in-process cache may answer")
_HIT = LOCAL_ADMISSIONS.labels("hit")
_MISS = LOCAL_ADMISSIONS.labels("miss")


@dataclass
class Lease:
    """Requests of one caller's shared budget taken at once (see the module docstring)."""

    tokens: int
    expires: float
    size: int
    remaining: int
    reset: int


@dataclass(frozen=True)
class Snapshot:
    """When a round trip started: the push sequence and the arming it saw."""

    seq: int
    epoch: int
    started: float


@dataclass(frozen=True)
class Quick:
    """An admission answered in process: the lease's numbers and, when asked for, the
    cached ``(generation, entry)`` as Redis held them."""

    remaining: int
    reset: int
    cached: tuple[bytes, bytes] | None


class LocalCache:
    """One web process's L1: tokens known not revoked, cached entries, rate-limit leases.

    Keys are the Redis key names the tracker reports: ``<prefix>gen:<user>``,
    ``<prefix>deny:jti:<jti>``, ``<prefix>deny:login:<login>``.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.armed = False
        self._alive_until = 0.0
        self.epoch = 0
        self.seq = 0
        self._pushed: dict[str, int] = {}
        self._push_times: deque[tuple[float, str, int]] = deque()
        self._tokens: dict[str, float] = {}
        #: user -> cache name -> (generation, entry as Redis holds it, when learnt)
        self._entries: dict[str, dict[str, tuple[bytes, bytes, float]]] = {}
        self._bytes = 0
        self._leases: dict[str, Lease] = {}

    # ---- the tracker's side -------------------------------------------------------------

    def arm(self, for_seconds: float) -> None:
        """The tracker is connected and registered: answers may be learnt from now on."""
        self.clear()
        self.armed = True
        self.alive(for_seconds)
        LOCAL_ARMED.set(1)

    def alive(self, for_seconds: float) -> None:
        """The tracker heard from Redis: answer for ``for_seconds`` more at most."""
        self._alive_until = time.monotonic() + for_seconds

    def disarm(self) -> None:
        """The tracker lost Redis (or is unsure): forget everything and answer nothing."""
        self.armed = False
        LOCAL_ARMED.set(0)
        self.clear()

    def clear(self) -> None:
        """Forget every token and entry (leases stay: they are spent budget, not copies)."""
        self.epoch += 1
        self._tokens.clear()
        self._entries.clear()
        self._bytes = 0

    def invalidate(self, keys: list[str] | None) -> None:
        """Drop what ``keys`` name (``None``: everything, as after ``FLUSHDB``): from a
        push, or from this process's own write."""
        if keys is None:
            self.clear()
            return
        now = time.monotonic()
        self.seq += 1
        for key in keys:
            self._pushed[key] = self.seq
            self._push_times.append((now, key, self.seq))
            rest = key[len(self.prefix) :] if key.startswith(self.prefix) else ""
            if rest.startswith("gen:"):
                self._forget_user(rest[4:])
            elif rest.startswith("deny:"):
                self._tokens.pop(rest, None)
        while self._push_times and now - self._push_times[0][0] > PUSH_MEMORY:
            _, old, seq = self._push_times.popleft()
            if self._pushed.get(old) == seq:  # its last push: nothing newer to remember
                del self._pushed[old]

    # ---- the gate's side ----------------------------------------------------------------

    def quick(
        self, jti: str, login: str, user: str, caller: str, cache_name: str | None
    ) -> Quick | None:
        """Admit one request in process, or ``None`` when a round trip is needed."""
        now = time.monotonic()
        if not self.armed or now >= self._alive_until:
            return None
        answer = self._answer(now, jti, login, user, caller, cache_name)
        (_MISS if answer is None else _HIT).inc()
        return answer

    def _answer(
        self, now: float, jti: str, login: str, user: str, caller: str, cache_name: str | None
    ) -> Quick | None:
        tokens = self._tokens
        if not (
            _fresh(tokens.get(f"deny:jti:{jti}"), now)
            and _fresh(tokens.get(f"deny:login:{login}"), now)
        ):
            return None
        cached = None
        if cache_name is not None:
            entry = self._entries.get(user, {}).get(cache_name)
            if entry is None or not _fresh(entry[2], now) or not _current(entry[0], entry[1]):
                return None
            cached = entry[0], entry[1]
        lease = self._leases.get(caller)
        if lease is None or lease.tokens <= 0 or now >= lease.expires:
            return None
        lease.tokens -= 1
        return Quick(lease.remaining + lease.tokens, lease.reset, cached)

    def snapshot(self) -> Snapshot:
        """Taken before a round trip: what :meth:`learn` compares against."""
        return Snapshot(self.seq, self.epoch, time.monotonic())

    def lease_request(self, caller: str, limit: int) -> tuple[int, int]:
        """How many requests the round trip should take, and how many to give back: the
        unspent requests of the caller's lease (taken off it now, so that two requests in
        flight never give back the same ones)."""
        lease = self._leases.get(caller)
        if lease is None:
            return 1, 0
        now = time.monotonic()
        give_back, lease.tokens = lease.tokens, 0
        cap = max(1, min(LEASE_MAX, limit // 10))
        if now < lease.expires and give_back == 0:
            ask = lease.size * 2  # used up before it expired: a busy caller
        elif now < lease.expires:
            ask = lease.size
        else:
            ask = lease.size // 2
        return max(1, min(cap, ask)), give_back

    def learn(
        self,
        snap: Snapshot,
        *,
        jti: str,
        login: str,
        user: str,
        caller: str,
        granted: int,
        asked: int,
        remaining: int,
        reset: int,
        cached: tuple[str, bytes | str | None, bytes | str | None] | None,
    ) -> None:
        """Keep what one round trip found: the token not revoked, the lease, the entry."""
        now = time.monotonic()
        if granted > 0:
            lease = self._leases.get(caller)
            if lease is None:
                if len(self._leases) >= MAX_TOKENS:
                    self._expire_leases(now)
                lease = self._leases[caller] = Lease(0, 0.0, 1, 0, 0)
            lease.tokens += granted - 1
            lease.expires = now + LEASE_SECONDS
            lease.size = asked
            lease.remaining, lease.reset = remaining, reset
        if not self.armed or snap.epoch != self.epoch or now - snap.started > PUSH_MEMORY / 2:
            return
        tokens = self._tokens
        for key in (f"deny:jti:{jti}", f"deny:login:{login}"):
            if self._pushed.get(self.prefix + key, 0) <= snap.seq:
                tokens.pop(key, None)
                tokens[key] = now
        while len(tokens) > MAX_TOKENS:
            del tokens[next(iter(tokens))]
        if cached is not None:
            name, gen, blob = cached
            if blob and self._pushed.get(f"{self.prefix}gen:{user}", 0) <= snap.seq:
                self._put_entry(user, name, _bytes(gen or b"0"), _bytes(blob), now)

    def _put_entry(self, user: str, name: str, gen: bytes, blob: bytes, now: float) -> None:
        entries = self._entries.pop(user, {})  # re-inserted last: evicted last
        old = entries.get(name)
        self._bytes += len(blob) - (len(old[1]) if old is not None else 0)
        entries[name] = (gen, blob, now)
        self._entries[user] = entries
        while self._bytes > MAX_BYTES and len(self._entries) > 1:
            self._forget_user(next(iter(self._entries)))

    def _forget_user(self, user: str) -> None:
        for _, blob, _ in self._entries.pop(user, {}).values():
            self._bytes -= len(blob)

    def _expire_leases(self, now: float) -> None:
        for caller in [c for c, lease in self._leases.items() if lease.expires <= now]:
            del self._leases[caller]


def _fresh(stored: float | None, now: float) -> bool:
    return stored is not None and now - stored < MAX_AGE


def _current(gen: bytes, blob: bytes) -> bool:
    """Whether a cached body's header (``<generation> <until>``, core/cache.py) names the
    generation held and its time has not passed."""
    stored_gen, _, rest = blob[: blob.find(b"\n")].partition(b" ")
    try:
        return stored_gen == gen and time.time() < float(rest)
    except ValueError:
        return False


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()
