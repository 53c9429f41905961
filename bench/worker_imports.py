"""Where a worker process's memory goes: RSS after each import step, in a fresh interpreter.

``python -m bench.worker_imports`` (product settings in the environment) imports, in order,
what bare Dramatiq needs, then each third-party package our worker loads, then our modules,
then builds the broker as ``workers.entry`` does, and prints one JSON object: the steps with
the RSS each added (MB). Attribution follows import order (a package shared by two steps is
charged to the first), so read it as "what the worker pays on top of bare Dramatiq".
"""

from __future__ import annotations

import importlib
import json
import sys

#: (label, modules imported in that step)
STEPS: list[tuple[str, tuple[str, ...]]] = [
    ("dramatiq + Redis broker (what bare Dramatiq loads)", ("dramatiq", "dramatiq.brokers.redis")),
    ("pydantic + pydantic-settings", ("pydantic", "pydantic_settings")),
    ("structlog", ("structlog",)),
    ("aiohttp", ("aiohttp",)),
    (
        "sentry-sdk + the integrations config/sentry.py imports",
        (
            "sentry_sdk",
            "sentry_sdk.integrations.aiohttp",
            "sentry_sdk.integrations.dramatiq",
            "sentry_sdk.integrations.logging",
        ),
    ),
    ("pymongo (async API)", ("pymongo", "pymongo.asynchronous.mongo_client")),
    ("fakeredis (imported by config/connections.py)", ("fakeredis",)),
    ("prometheus-client", ("prometheus_client",)),
    (
        "cryptography, argon2, PyJWT",
        (
            "cryptography.hazmat.primitives.ciphers.aead",
            "argon2",
            "jwt",
        ),
    ),
    ("pika (workers/ops.py)", ("pika",)),
    ("our modules (config, core, workers)", ("workers.broker", "workers.entry")),
]


def rss_mb() -> float:
    """This process's resident set (MB)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    """Import step by step (the last step builds the broker) and print the RSS each added."""
    steps = [{"step": "python interpreter", "mb": round(rss_mb(), 1), "modules": 0}]
    previous, loaded = rss_mb(), len(sys.modules)
    for label, modules in STEPS:
        for name in modules:
            importlib.import_module(name)
        now = rss_mb()
        steps.append(
            {
                "step": label,
                "mb": round(now - previous, 1),
                "modules": len(sys.modules) - loaded,
            }
        )
        previous, loaded = now, len(sys.modules)
    print(json.dumps({"steps": steps, "total_mb": round(rss_mb(), 1)}))


if __name__ == "__main__":
    main()
