"""Trial optimisations of the web process, applied by ``python -m bench.webproc --patches``.

Each is the smallest monkeypatch that shows what one change to the product would gain, so the
API benchmark can measure it end to end, in the same run, against the unpatched process. None
of them is product code; each names the change it stands for. None is pending today (``--trials
all`` then measures a second unpatched process beside the first): the mechanism stays for the
next trial.

Adopted in the product since they were measured here (so no longer trials): remembering
verified access tokens (``core/security.py``), caching the first page and the stats as response
bytes (``core/cache.py``), importing fakeredis lazily (``config/connections.py``), the
revocation check and the rate limit in one round trip (``core/gate.py``), dropping log calls
below ``LOG_LEVEL`` first (``config/logging.py``) and a fixed 1 MiB malloc mmap threshold, so
argon2id's 19 MiB buffers go back to the system (``web/app.py``, and the image's
``MALLOC_MMAP_THRESHOLD_``), and one middleware and one response-prepare callback instead of
three and two, with the access line skipped below its level (``web/middlewares.py``; measured
2026-12-01: web CPU per cached stats answer -15 %, per first page -8 %).
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable
from typing import Any

PATCHES: dict[str, Callable[[], None]] = {}
#: Trials that are environment settings of the web process rather than code.
ENV_PATCHES: dict[str, dict[str, str]] = {}


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
