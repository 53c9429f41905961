"""Trial optimisations of the web process, applied by ``python -m bench.webproc --patches``.

Each is the smallest monkeypatch that shows what one change to the product would gain, so the
API benchmark can measure it end to end, in the same run, against the unpatched process. None
of them is product code; each names the change it stands for.

* ``token_cache``: remember verified access tokens (until they expire) instead of verifying
  the HMAC and re-parsing the JWT on every request. Revocation is unaffected: the denylist is
  still asked on every request.
* ``log_filter``: drop log calls below ``LOG_LEVEL`` before structlog's processors run
  (``structlog.stdlib.filter_by_level`` first); today every request's access line is
  timestamped and formatted, then dropped by the stdlib level check.
* ``page_bytes``: cache the first page's response *body* and answer a hit with those bytes,
  instead of caching the model as JSON and paying json.loads + model_validate +
  model_dump_json on every hit.
* ``one_round_trip``: ask the token denylist and spend the rate limit in one Redis pipeline
  instead of two round trips (the product could fold the denylist into the rate-limit script).
* ``lazy_fakeredis``: import fakeredis only when it is used (no ``REDIS_URL``): the web
  process imports it at start-up (config/connections.py) with numpy and friends, for nothing.
* ``malloc_mmap_threshold`` (an environment setting, not a patch): a fixed glibc
  ``MALLOC_MMAP_THRESHOLD_`` of 1 MiB, so the 19 MiB argon2 buffers of each sign-in are
  returned to the system instead of staying in the heap of the thread that hashed.
"""

from __future__ import annotations

import importlib
import sys
import time
import types
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

PATCHES: dict[str, Callable[[], None]] = {}
#: Trials that are environment settings of the web process rather than code.
ENV_PATCHES: dict[str, dict[str, str]] = {
    "malloc_mmap_threshold": {"MALLOC_MMAP_THRESHOLD_": str(1024 * 1024)},
}


def patch(fn: Callable[[], None]) -> Callable[[], None]:
    """Register a trial patch under its function name."""
    PATCHES[fn.__name__] = fn
    return fn


def apply(names: list[str]) -> None:
    """Apply the named patches (before the app and its route table are built)."""
    if "web.routes" in sys.modules:
        raise RuntimeError("apply patches before web.routes is imported")
    # Before any other patch imports product modules (which import config.connections).
    names = sorted(names, key=lambda n: n != "lazy_fakeredis")
    for name in names:
        if name in ENV_PATCHES:
            continue  # set by whoever starts the process
        if name not in PATCHES:
            raise SystemExit(f"unknown patch {name!r}; known: {', '.join(PATCHES)}")
        PATCHES[name]()


@patch
def token_cache() -> None:
    """Verified access tokens are remembered until they expire."""
    from core import security

    original = security.Tokens.decode
    verified: dict[tuple[str, str, str], security.TokenClaims] = {}

    def decode(self: security.Tokens, token: str, expected: security.TokenType) -> Any:
        key = (self._key, token, expected)
        claims = verified.get(key)
        # The same 5 s leeway as the full check.
        if claims is not None and claims.expires_at + 5 > time.time():
            return claims
        claims = original(self, token, expected)
        if len(verified) >= 10_000:
            verified.clear()
        verified[key] = claims
        return claims

    security.Tokens.decode = decode  # type: ignore[method-assign]


@patch
def log_filter() -> None:
    """Log calls below the level are dropped first."""
    import structlog

    import config.logging as logging_config

    original = logging_config.setup_logging

    def setup_logging(settings: Any, *, process: str) -> None:
        original(settings, process=process)
        processors = structlog.get_config()["processors"]
        structlog.configure(processors=[structlog.stdlib.filter_by_level, *processors])

    logging_config.setup_logging = setup_logging


@patch
def page_bytes() -> None:
    """The first page is cached as the response body."""
    from aiohttp import web

    from core import cache, tasks
    from web.handlers import tasks as handlers
    from web.keys import CONTEXT
    from web.routing import claims, query

    original = handlers.list_tasks

    async def list_tasks(request: web.Request) -> web.Response:
        q = query(request, tasks.TaskQuery)
        if q != tasks.FIRST_PAGE:
            return await original(request)
        ctx = request.app[CONTEXT]
        owner = claims(request).subject
        gen_key, body_key = ctx.key("gen", owner), ctx.key("cache", "first_page_body", owner)
        gen_raw, blob = await ctx.redis.mget(gen_key, body_key)
        gen = int(gen_raw or 0)
        if blob is not None:
            raw = blob if isinstance(blob, bytes) else blob.encode()
            head, _, body = raw.partition(b"\n")
            if int(head) == gen:
                return web.Response(body=body, content_type="application/json", charset="utf-8")
        page = await tasks.list_page(ctx, owner, q)
        body = page.model_dump_json().encode()
        # Stored with the generation read before computing, as core.cache does.
        await ctx.redis.set(body_key, str(gen).encode() + b"\n" + body, ex=cache.TTL_SECONDS)
        return web.Response(body=body, content_type="application/json", charset="utf-8")

    handlers.list_tasks = list_tasks


_PENDING: ContextVar[tuple[str, Any] | None] = ContextVar("bench_pending_limit", default=None)


@patch
def one_round_trip() -> None:
    """Denylist EXISTS and rate-limit EVALSHA share one pipeline."""
    from redis.exceptions import RedisError

    from core import accounts, ratelimit
    from core.errors import Unauthorized

    original_auth, original_check = accounts.authenticate, ratelimit.check

    async def authenticate(ctx: Any, token: str) -> Any:
        claims = ctx.tokens.decode(token, "access")
        caller = f"user:{claims.subject}"
        policy = ratelimit.Policy.from_settings(ctx.settings)
        try:
            async with ctx.redis.pipeline(transaction=False) as pipe:
                pipe.exists(
                    ctx.key("deny", "jti", claims.jti), ctx.key("deny", "login", claims.login_id)
                )
                pipe.evalsha(
                    ratelimit._SHA, 1, ctx.key("ratelimit", caller), policy.limit, policy.window
                )
                denied, raw = await pipe.execute(raise_on_error=False)
        except RedisError:
            return await original_auth(ctx, token)
        if isinstance(denied, Exception):
            return await original_auth(ctx, token)
        if denied:
            raise Unauthorized("Token has been revoked")
        if not isinstance(raw, Exception):  # NoScriptError: the normal path loads the script
            allowed, remaining, reset_ms = (int(v) for v in raw)
            decision = ratelimit.Decision(
                bool(allowed), policy, remaining=remaining, reset=-(-reset_ms // 1000)
            )
            _PENDING.set((caller, decision))
        return claims

    async def check(ctx: Any, caller: str) -> Any:
        pending = _PENDING.get()
        if pending is not None and pending[0] == caller:
            _PENDING.set(None)
            return pending[1]
        return await original_check(ctx, caller)

    accounts.authenticate = authenticate
    ratelimit.check = check


class _LazyModule(types.ModuleType):
    """Stands in for a module until one of its attributes is used, then imports it.

    (``importlib.util.LazyLoader`` does not help here: on Python 3.11 the import statement
    itself reads ``__spec__`` of the module found in ``sys.modules``, which loads it.)
    """

    def __getattr__(self, name: str) -> Any:
        real = sys.modules.get(self.__name__)
        if real is self or real is None:
            del sys.modules[self.__name__]
            real = importlib.import_module(self.__name__)
        return getattr(real, name)


@patch
def lazy_fakeredis() -> None:
    """fakeredis is imported on first use only."""
    if "fakeredis" in sys.modules:
        raise RuntimeError("fakeredis is already imported")
    sys.modules["fakeredis"] = _LazyModule("fakeredis")
