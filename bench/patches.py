"""Trial optimisations of the web process, applied by ``python -m bench.webproc --patches``.

Each is the smallest monkeypatch that shows what one change to the product would gain, so the
API benchmark can measure it end to end, in the same run, against the unpatched process. None
of them is product code; each names the change it stands for.

* ``log_filter``: drop log calls below ``LOG_LEVEL`` before structlog's processors run
  (``structlog.stdlib.filter_by_level`` first); today every request's access line is
  timestamped and formatted, then dropped by the stdlib level check.
* ``one_round_trip``: ask the token denylist and spend the rate limit in one Redis pipeline
  instead of two round trips (the product could fold the denylist into the rate-limit script).
* ``malloc_mmap_threshold`` (an environment setting, not a patch): a fixed glibc
  ``MALLOC_MMAP_THRESHOLD_`` of 1 MiB, so the 19 MiB argon2 buffers of each sign-in are
  returned to the system instead of staying in the heap of the thread that hashed.

Adopted in the product since they were measured here (so no longer trials): remembering
verified access tokens (``core/security.py``), caching the first page and the stats as response
bytes (``core/cache.py``), importing fakeredis lazily (``config/connections.py``), and the
malloc threshold in the image (``Dockerfile``; the trial stays, the bench's web process runs
without it).
"""

from __future__ import annotations

import importlib
import sys
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
