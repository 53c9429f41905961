"""The API rate limit: a GCRA bucket per caller in Redis, shared by every web replica.

GCRA (the generic cell rate algorithm, a leaky bucket kept as one timestamp) stores per caller
only its *theoretical arrival time* (TAT): when the bucket would be empty again if the caller
stopped now. A policy of ``limit`` requests per ``window`` seconds spends ``window / limit`` of
that time per request and allows a request while the TAT stays within one window of now. So a
fresh caller may burst ``limit`` requests at once, then gets one more every ``window / limit``
seconds: no fixed-window edge where twice the quota passes, O(1) memory, and an exact
``Retry-After``.

One Lua script does the read, the decision and the write atomically in one round trip
(``EVALSHA``, falling back to ``EVAL`` once per server), with Redis's own clock (``TIME``) so
replicas with skewed clocks still agree. It runs on real Redis and on fakeredis (with lupa).

If Redis cannot be reached the request is allowed (fail open): the rate limit protects the
service, and an outage of Redis must not become an outage of the API. The decision says so
(``degraded``) so the caller can count it; a warning is logged once per outage.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from config.logging import get_logger
from config.settings import Settings
from core.context import Context

log = get_logger(__name__)

#: KEYS[1]: the caller's bucket. ARGV[1]: limit (requests), ARGV[2]: window (seconds);
#: optional ARGV[3]: how many requests to take at once (default 1) and ARGV[4]: how many taken
#: earlier to give back first (default 0), both for the web's leases (core/local_cache.py).
#: Returns {allowed (0|1), remaining, ms until the available quota next grows, how many were
#: taken (1 up to ARGV[3], as many as the bucket holds; 0 when refused)}.
#: Times are integer microseconds, exact in Lua's doubles (now is ~2^51). ``core/gate.py``
#: runs the same body inside its one-round-trip script.
GCRA_BODY = """
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2]) * 1000000
local ask = tonumber(ARGV[3] or '1')
local refund = tonumber(ARGV[4] or '0')
local interval = math.floor(window / limit)
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') - refund * interval
if tat < now then tat = now end
local available = math.floor((now + window - tat) / interval)
if available < 1 then
  if refund > 0 then
    redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX',
      math.max(1, math.ceil((tat - now) / 1000)))
  end
  return {0, 0, math.ceil((tat + interval - window - now) / 1000), 0}
end
local granted = math.min(ask, available)
local new_tat = tat + granted * interval
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX',
  math.max(1, math.ceil((new_tat - now) / 1000)))
local remaining = math.floor((now + window - new_tat) / interval)
local grows_at = new_tat - window + (remaining + 1) * interval
return {1, remaining, math.ceil((grows_at - now) / 1000), granted}
"""
_SCRIPT = GCRA_BODY
_SHA = hashlib.sha1(_SCRIPT.encode(), usedforsecurity=False).hexdigest()

#: While Redis keeps failing, repeat the warning at most this often (seconds).
OUTAGE_LOG_EVERY = 60.0


@dataclass(frozen=True)
class Policy:
    """``limit`` requests per ``window`` seconds (``RATE_LIMIT``), under a policy ``name``."""

    limit: int
    window: int
    name: str = "default"

    def __post_init__(self) -> None:
        if self.limit < 1 or self.window < 1:
            raise ValueError(
                "a rate-limit policy allows at least 1 request in a window of 1 s or more"
            )
        if self.limit > self.window * 1_000_000:
            # The script spends window/limit whole microseconds per request: 0 would divide
            # by zero (config.settings refuses such a RATE_LIMIT at start already).
            raise ValueError("a rate-limit policy allows at most one request per microsecond")

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        """The policy ``RATE_LIMIT`` describes (built once per text: every request asks, and
        parsing and validating cost 1.6 us of a cached read's ~100)."""
        policy = _POLICIES.get(settings.rate_limit)
        if policy is None:
            if len(_POLICIES) >= 64:  # tests build many settings; a process has one
                _POLICIES.clear()
            policy = _POLICIES[settings.rate_limit] = cls(*settings.rate_limit_parsed)
        return policy


#: ``RATE_LIMIT`` text -> its :class:`Policy` (immutable, so shared).
_POLICIES: dict[str, Policy] = {}


@dataclass(frozen=True)
class Decision:
    """The answer for one request.

    ``remaining`` is how many more requests would be allowed right now; ``reset`` is how many
    seconds until that number next grows (when refused: the ``Retry-After``). ``degraded``
    means Redis could not be asked and the request was let through unchecked.
    """

    allowed: bool
    policy: Policy
    remaining: int
    reset: int
    degraded: bool = False


class _OutageLog:
    """Logs a Redis outage once when it starts, at most every ``every`` s while it lasts, and
    once when it ends, however many requests fail in between (process-wide, like logging)."""

    def __init__(self, every: float = OUTAGE_LOG_EVERY):
        self.every = every
        self.since: float | None = None
        self.last_warned = 0.0
        self.failures = 0

    def failed(self, exc: BaseException) -> bool:
        """Record one failure; returns whether a warning was logged for it."""
        now = time.monotonic()
        self.failures += 1
        if self.since is None:
            self.since, self.last_warned, self.failures = now, now, 1
            log.warning("ratelimit.fail_open", error=repr(exc))
            return True
        if now - self.last_warned >= self.every:
            self.last_warned = now
            log.warning(
                "ratelimit.fail_open_continues",
                error=repr(exc),
                seconds=round(now - self.since),
                failures=self.failures,
            )
            return True
        return False

    def succeeded(self) -> None:
        """Record a success, noting the recovery if an outage was under way."""
        if self.since is not None:
            log.info(
                "ratelimit.recovered",
                seconds=round(time.monotonic() - self.since),
                failures=self.failures,
            )
            self.since, self.failures = None, 0


#: The process's record of a Redis outage as the rate limit sees it.
outage = _OutageLog()


def fail_open(policy: Policy, exc: BaseException) -> Decision:
    """The decision when Redis could not be asked: allowed, ``degraded`` (the outage noted)."""
    outage.failed(exc)
    return Decision(True, policy, remaining=policy.limit, reset=0, degraded=True)


async def hit(redis: aioredis.Redis, key: str, policy: Policy) -> Decision:
    """Spend one request from the bucket at ``key``; fail open when Redis is unreachable."""
    args = (key, policy.limit, policy.window)
    try:
        try:
            raw = await redis.evalsha(_SHA, 1, *args)
        except NoScriptError:
            # First use on this server (or after SCRIPT FLUSH / a restart): EVAL caches it.
            raw = await redis.eval(_SCRIPT, 1, *args)
    except (RedisError, OSError, TimeoutError) as exc:
        return fail_open(policy, exc)
    outage.succeeded()
    allowed, remaining, reset_ms = (int(v) for v in raw[:3])
    return Decision(bool(allowed), policy, remaining=remaining, reset=-(-reset_ms // 1000))


async def check(ctx: Context, caller: str) -> Decision:
    """Spend one request of ``caller``'s budget (e.g. ``user:<id>``, ``addr:<ip>``) under
    ``RATE_LIMIT``."""
    return await hit(ctx.redis, ctx.key("ratelimit", caller), Policy.from_settings(ctx.settings))
