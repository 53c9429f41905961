"""One Redis round trip for what every authenticated, rate-limited request asks first.

Before it, a cached read cost three sequential round trips: the token's revocation (``EXISTS``
on the logout and login denylists), the rate limit (the GCRA script of ``core/ratelimit.py``)
and the cache (``MGET`` of the user's generation and the cached body, ``core/cache.py``).
Measured on this machine, aiohttp answering with one Redis command per request does 9.9k req/s
and with three sequential commands 4.5k: the round trips were most of a cached read's cost.

:func:`admit` runs one Lua script that does all three in order, atomically, with the same
rules as the separate steps:

1. a revoked token (either denylist key present) stops there: nothing is spent from the
   user's budget (the route then counts the refusal against the address, as before);
2. the user's budget is spent as ``core/ratelimit.py``'s script spends it (same GCRA, same
   clock, same key), and a refused request reads nothing more;
3. when the route names a cached value (``stats``, the first page of the task list), its
   generation and entry are read and handed to :func:`core.cache.cached_json` through
   :data:`core.cache.PREFETCHED`, which then needs no round trip of its own on a hit.

With an armed in-process cache (``core/local_cache.py``, the web's default on a real Redis)
the process answers all three itself when it holds them, and the round trip takes a *lease*
of several requests of the caller's budget instead of one.

Failures keep each step's own rule: Redis unreachable → the revocation is checked in MongoDB
(the store holds the truth), the rate limit fails open (``degraded``) and the cache computes.

The script touches keys of one user only, but of different names; a Redis Cluster would need
them in one hash slot (``{user}`` hash tags). The platform runs on one Redis (with replicas or
Sentinel), where any keys may be combined.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from redis.exceptions import NoScriptError, RedisError

from config.logging import get_logger
from core import cache, ratelimit
from core.context import Context
from core.security import TokenClaims

log = get_logger(__name__)

#: KEYS: deny jti, deny login, the caller's bucket, then (optionally) the user's cache
#: generation and the cached entry. ARGV: limit, window, requests to take, requests to give
#: back (as ``core/ratelimit.py``). Returns {1} when revoked, else {0, allowed, remaining, ms
#: until the quota grows, requests taken, generation or false, entry or false}.
_SCRIPT = (
    """
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then
  return {1}
end
local function spend()
"""
    + ratelimit.GCRA_BODY.replace("KEYS[1]", "KEYS[3]")
    + """
end
local decision = spend()
if decision[1] == 0 or #KEYS < 5 then
  return {0, decision[1], decision[2], decision[3], decision[4]}
end
local gen = redis.call('GET', KEYS[4])
local entry = redis.call('GET', KEYS[5])
return {0, decision[1], decision[2], decision[3], decision[4], gen, entry}
"""
)
_SHA = hashlib.sha1(_SCRIPT.encode(), usedforsecurity=False).hexdigest()


@dataclass(frozen=True)
class Admission:
    """What :func:`admit` found: whether the token is revoked, the rate-limit decision (none
    when revoked) and, when asked for, the cache's ``(generation, entry)`` as Redis holds them
    (``None`` when not read)."""

    revoked: bool
    decision: ratelimit.Decision | None = None
    cached: cache.Entry | None = None


async def admit(
    ctx: Context, claims: TokenClaims, caller: str, cache_name: str | None = None
) -> Admission:
    """Check ``claims``' revocation, spend one request of ``caller``'s budget under
    ``RATE_LIMIT`` and read the ``cache_name`` entry of the user, in one round trip."""
    policy = ratelimit.Policy.from_settings(ctx.settings)
    local = ctx.local
    ask, give_back = 1, 0
    if local is not None:
        quick = local.quick(claims.jti, claims.login_id, claims.subject, caller, cache_name)
        if quick is not None:
            decision = ratelimit.Decision(True, policy, quick.remaining, quick.reset)
            return Admission(revoked=False, decision=decision, cached=quick.cached)
        snap = local.snapshot()
        ask, give_back = local.lease_request(caller, policy.limit)
    keys: list[str] = [
        ctx.key("deny", "jti", claims.jti),
        ctx.key("deny", "login", claims.login_id),
        ctx.key("ratelimit", caller),
    ]
    if cache_name is not None:
        keys += [ctx.key("gen", claims.subject), ctx.key("cache", cache_name, claims.subject)]
    args: list[str | int] = [*keys, policy.limit, policy.window, ask, give_back]
    try:
        try:
            raw = await ctx.redis.evalsha(_SHA, len(keys), *args)
        except NoScriptError:
            raw = await ctx.redis.eval(_SCRIPT, len(keys), *args)
    except (RedisError, OSError, TimeoutError) as exc:
        return await _without_redis(ctx, claims, exc)
    ratelimit.outage.succeeded()
    if int(raw[0]):
        return Admission(revoked=True)
    allowed, remaining, reset_ms, granted = (int(v) for v in raw[1:5])
    reset = -(-reset_ms // 1000)
    cached = None
    if len(raw) > 5:
        cached = (raw[5] or None, raw[6] or None)
    if local is not None:
        local.learn(
            snap,
            jti=claims.jti,
            login=claims.login_id,
            user=claims.subject,
            caller=caller,
            granted=granted,
            asked=ask,
            remaining=remaining,
            reset=reset,
            cached=None if cached is None or cache_name is None else (cache_name, *cached),
        )
    # The requests this process now holds for the caller are theirs to spend too.
    decision = ratelimit.Decision(
        bool(allowed), policy, remaining=remaining + max(0, granted - 1), reset=reset
    )
    return Admission(revoked=False, decision=decision, cached=cached)


async def _without_redis(ctx: Context, claims: TokenClaims, exc: BaseException) -> Admission:
    """Each step's rule when Redis cannot be asked: revocation from MongoDB, the rate limit
    open, the cache not read."""
    log.warning("auth.denylist_unavailable_fallback_to_store")
    doc = await ctx.store["logins"].find_one({"_id": claims.login_id}, {"revoked": 1})
    if doc is None or bool(doc.get("revoked")):
        return Admission(revoked=True)
    policy = ratelimit.Policy.from_settings(ctx.settings)
    return Admission(revoked=False, decision=ratelimit.fail_open(policy, exc))
