"""config: settings, connections, logging; and, before anything else, three lean imports.

Each package of ours imports this one first (their ``__init__`` do), so in every process PyJWT,
PyMongo and structlog are first imported here, with optional extras held out of their imports:

* PyJWT imports cryptography, when it is installed, for its RSA and EC algorithms. Our tokens are
  HS256 only (``core/security.py`` pins the algorithm), so it is imported without them.
* PyMongo tries its pyOpenSSL TLS context first. Without pyOpenSSL or service_identity installed
  that attempt fails, but only after importing ``cryptography.x509``; it is held out only then,
  so an installation with both (for OCSP) keeps them.
* structlog imports Rich (2.9 MB with Pygments), when it is installed, for its console
  tracebacks. Rich is no dependency of ours (development tools pull it in); the console format
  prints plain tracebacks (``config/logging.py``), so a process's memory does not depend on
  what else is installed beside it.

cryptography's compiled binding is 8.5 MB of a process's RSS; with these held out, a process
building the web app takes 75 MB instead of 88. The two features that need cryptography (sealed
webhook secrets, stored idempotent responses) import it on first use (``core.security.seal``).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext


@contextmanager
def _held_out(name: str) -> Iterator[None]:
    """While inside, ``import name`` raises ModuleNotFoundError (``None`` in ``sys.modules``)."""
    before = sys.modules.get(name)
    sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if before is None:
            del sys.modules[name]
        else:
            sys.modules[name] = before


with _held_out("cryptography"):
    import jwt  # noqa: F401
_pyopenssl = all(importlib.util.find_spec(n) for n in ("OpenSSL", "service_identity"))
with nullcontext() if _pyopenssl else _held_out("cryptography"):
    import pymongo  # noqa: F401
with _held_out("rich"), _held_out("better_exceptions"):
    import structlog  # noqa: F401
