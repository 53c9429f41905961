"""The API rate limit in the web layer: who the caller is, the headers, the 429.

The route wrapper (:func:`web.routing.wrap`) keeps one :class:`Budget` per request of a
rate-limited route: it spends one request right after authentication (per user id), or first
thing on anonymous routes and when authentication fails (per client address), and puts the
``RateLimit`` / ``RateLimit-Policy`` fields (draft-ietf-httpapi-ratelimit-headers) on the
answer, whether a success, an error or the 429 itself. Routes outside ``RATE_LIMIT`` (the
admin routes) still count a request refused for bad credentials against its address
(:meth:`Budget.on_error`), so tokens cannot be guessed there at full speed either.

``/metrics`` and ``/api/v1/openapi.json`` answer anyone: they spend from a separate, generous
per-address budget (:data:`OPERATIONS_POLICY`, :func:`spend_operations_budget`) and carry the
fields on their 429 only. ``/healthz`` and ``/readyz`` are never limited (probes must not be
throttled); readiness is cached instead (web/handlers/probes.py).
"""

from __future__ import annotations

import ipaddress

from aiohttp import web

from core import cache, gate, ratelimit
from core.errors import AppError, RateLimited, Unauthorized
from core.security import TokenClaims
from web.keys import CONTEXT
from web.metrics import RATELIMIT_FAILOPEN, RATELIMIT_REJECTED


def caller_of(request: web.Request, claims: TokenClaims | None) -> tuple[str, str]:
    """The bucket a request spends from and its kind: ``("user:<id>", "user")`` when
    authenticated, else ``("addr:<address>", "address")``."""
    if claims is not None:
        return f"user:{claims.subject}", "user"
    return f"addr:{client_address(request.remote)}", "address"


def client_address(remote: str | None) -> str:
    """The address a caller is limited by; IPv6 by /64, the block one subscriber gets, so
    that walking through one's own prefix does not reset the budget."""
    if not remote:
        return "unknown"
    try:
        ip = ipaddress.ip_address(remote)
    except ValueError:
        return remote
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


#: The per-address budget of the unauthenticated operations routes in
#: :data:`OPERATIONS_LIMITED`: far above what a scraper or a docs page needs.
OPERATIONS_POLICY = ratelimit.Policy(600, 60, "operations")
OPERATIONS_LIMITED = frozenset({"/metrics", "/api/v1/openapi.json"})


async def spend_operations_budget(request: web.Request) -> None:
    """Count an operations request against its address (:data:`OPERATIONS_POLICY`)."""
    ctx = request.app[CONTEXT]
    caller = f"addr:{client_address(request.remote)}"
    decision = await ratelimit.hit(
        ctx.redis, ctx.key("ratelimit", "operations", caller), OPERATIONS_POLICY
    )
    _refuse_if_spent(decision, "address")


def _refuse_if_spent(decision: ratelimit.Decision, kind: str) -> None:
    """Count the decision; raise the 429 (with the fields) when the budget is spent."""
    if decision.degraded:
        RATELIMIT_FAILOPEN.inc()
        return
    if not decision.allowed:
        RATELIMIT_REJECTED.labels(kind).inc()
        policy = decision.policy
        exc = RateLimited(
            f"Rate limit of {policy.limit} requests per {policy.window} s reached;"
            f" retry in {decision.reset} s",
            decision.reset,
        )
        exc.headers.update(headers_for(decision))
        raise exc


def headers_for(decision: ratelimit.Decision) -> dict[str, str]:
    """The draft's fields for one decision. When Redis could not be asked only the (static)
    policy is sent: the current service limit is unknown and is not made up."""
    policy = decision.policy
    headers = {"RateLimit-Policy": f'"{policy.name}";q={policy.limit};w={policy.window}'}
    if not decision.degraded:
        headers["RateLimit"] = f'"{policy.name}";r={decision.remaining};t={decision.reset}'
    return headers


class Budget:
    """One request's rate-limit bookkeeping (see the module docstring)."""

    def __init__(self, request: web.Request):
        self.request = request
        self.headers: dict[str, str] | None = None

    async def admit(self, token: str, cached: str | None = None) -> TokenClaims:
        """Verify an access token and spend one request of its user, in one Redis round trip
        with the revocation check and, when ``cached`` names one, the cache's read
        (``core/gate.py``); raise :class:`Unauthorized` or :class:`RateLimited`."""
        ctx = self.request.app[CONTEXT]
        claims = ctx.tokens.decode(token, "access")
        caller, kind = caller_of(self.request, claims)
        admission = await gate.admit(ctx, claims, caller, cached)
        if admission.revoked or admission.decision is None:
            raise Unauthorized("Token has been revoked")
        self.headers = headers_for(admission.decision)
        _refuse_if_spent(admission.decision, kind)
        if cached is not None and admission.cached is not None:
            cache.PREFETCHED.set((cached, claims.subject, admission.cached))
        return claims

    async def spend(self, claims: TokenClaims | None) -> None:
        """Count the request against its caller; raise :class:`RateLimited` when spent."""
        caller, kind = caller_of(self.request, claims)
        decision = await ratelimit.check(self.request.app[CONTEXT], caller)
        self.headers = headers_for(decision)
        _refuse_if_spent(decision, kind)

    async def on_error(self, exc: AppError) -> None:
        """Put the fields on an error answer. A request refused before it was counted (bad
        credentials) is counted against its address first, so guessing tokens is limited
        too; that may turn the error into a 429."""
        if self.headers is None:
            await self.spend(None)
        exc.headers.update(self.headers or {})

    def on_response(self, response: web.StreamResponse) -> None:
        """Put the fields on a handler's answer."""
        if self.headers and not response.prepared:
            response.headers.update(self.headers)
