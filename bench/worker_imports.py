"""Where a worker process's memory goes: RSS after each import step, in a fresh interpreter.

``python -m bench.worker_imports`` (product settings in the environment) first asks a separate
interpreter which packages ``workers.entry`` (what ``taskmanager worker`` loads) ends up
importing; then, in this interpreter, imports those packages step by step in the order below
(what bare Dramatiq needs first, then each third-party package, then our modules, whose import
builds the broker as ``workers.entry`` does) and prints one JSON object: the RSS each step
added (MB). A step the worker does not load is listed as such, with 0 MB. Attribution follows
import order (a package shared by two steps is charged to the first), so read it as "what the
worker pays on top of bare Dramatiq".
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

#: (label, modules imported in that step, those of them the worker loads)
STEPS: list[tuple[str, tuple[str, ...]]] = [
    ("dramatiq + Redis broker (what bare Dramatiq loads)", ("dramatiq", "dramatiq.brokers.redis")),
    ("pydantic + pydantic-settings", ("pydantic", "pydantic_settings")),
    ("structlog", ("structlog",)),
    ("aiohttp", ("aiohttp",)),
    (
        "sentry-sdk + its aiohttp, dramatiq and logging integrations",
        (
            "sentry_sdk",
            "sentry_sdk.integrations.aiohttp",
            "sentry_sdk.integrations.dramatiq",
            "sentry_sdk.integrations.logging",
        ),
    ),
    ("pymongo (async API)", ("pymongo", "pymongo.asynchronous.mongo_client")),
    ("fakeredis", ("fakeredis",)),
    ("prometheus-client", ("prometheus_client",)),
    (
        "cryptography, argon2, PyJWT",
        ("cryptography.hazmat.primitives.ciphers.aead", "argon2", "jwt"),
    ),
    ("pika", ("pika",)),
    ("our modules (config, core, workers; builds the broker)", ("workers.entry",)),
]

_LOADED = "import json, sys, workers.entry; print(json.dumps(sorted(sys.modules)))"


def rss_mb() -> float:
    """This process's resident set (MB)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def worker_modules() -> set[str]:
    """The modules a worker process has imported once its broker is built."""
    proc = subprocess.run(
        [sys.executable, "-c", _LOADED], capture_output=True, text=True, timeout=120, check=True
    )
    return set(json.loads(proc.stdout))


def main() -> None:
    """Import step by step and print the RSS each step added."""
    loaded = worker_modules()
    steps = [{"step": "python interpreter", "mb": round(rss_mb(), 1), "modules": 0}]
    previous, count = rss_mb(), len(sys.modules)
    for label, modules in STEPS:
        wanted = [m for m in modules if m in loaded]
        for name in wanted:
            importlib.import_module(name)
        now = rss_mb()
        steps.append(
            {
                "step": label if wanted else f"{label}: not loaded by the worker",
                "mb": round(now - previous, 1),
                "modules": len(sys.modules) - count,
            }
        )
        previous, count = now, len(sys.modules)
    print(json.dumps({"steps": steps, "total_mb": round(rss_mb(), 1)}))


if __name__ == "__main__":
    main()
