"""No-op actors for the worker benchmark (``bench/workers.py``): bare Dramatiq and ours.

The benchmark enqueues through :func:`bare_broker` / :func:`our_broker` in its own process, and
a ``dramatiq bench.worker_noop:broker`` subprocess drains the queue. Which broker that worker
process serves is chosen by its environment, read only when the CLI asks for ``broker``:

* ``BENCH_NOOP_BROKER=bare``: a plain ``RedisBroker(url=BENCH_REDIS_URL,
  namespace=BENCH_NAMESPACE)`` with Dramatiq's default middleware and a plain sync no-op;
* ``BENCH_NOOP_BROKER=ours``: exactly what ``workers.entry`` builds for ``taskmanager worker``
  (settings from the product variables, logging, Sentry, :func:`workers.broker.build_broker`
  with every actor and our middleware), plus the no-ops declared with our actor defaults.
"""

from __future__ import annotations

import os
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from config.settings import Settings

#: The queue every no-op is sent to (one per namespace; each run has its own namespace).
QUEUE = "bench_noop"
Actors = dict[str, dramatiq.Actor[Any, Any]]


def noop_sync() -> None:
    """Does nothing (a plain function: runs on the worker thread)."""


async def noop_async() -> None:
    """Does nothing (a coroutine: runs on the AsyncIO middleware's event-loop thread)."""


def bare_broker(url: str, namespace: str) -> tuple[dramatiq.Broker, Actors]:
    """A plain Redis broker, as Dramatiq's documentation sets one up, with the sync no-op."""
    broker = RedisBroker(url=url, namespace=namespace)  # type: ignore[no-untyped-call]
    actor = dramatiq.actor(noop_sync, broker=broker, queue_name=QUEUE)  # type: ignore[call-overload]
    return broker, {"noop_sync": actor}


def our_broker(settings: Settings) -> tuple[dramatiq.Broker, Actors]:
    """Our broker (``build_broker``) with both no-ops declared like our actors."""
    from config.connections import Connections
    from workers.actors import DEFAULTS
    from workers.broker import build_broker

    broker = build_broker(Connections(settings)).broker
    actors: Actors = {
        fn.__name__: dramatiq.actor(  # type: ignore[call-overload]
            fn, actor_name=fn.__name__, queue_name=QUEUE, broker=broker, **DEFAULTS
        )
        for fn in (noop_sync, noop_async)
    }
    return broker, actors


def _from_env() -> dramatiq.Broker:
    kind = os.environ.get("BENCH_NOOP_BROKER")
    if kind == "bare":
        return bare_broker(os.environ["BENCH_REDIS_URL"], os.environ["BENCH_NAMESPACE"])[0]
    if kind == "ours":
        from config.logging import setup_logging
        from config.sentry import setup_sentry

        settings = Settings()
        setup_logging(settings, process="worker")
        setup_sentry(settings, process="worker")
        return our_broker(settings)[0]
    raise RuntimeError(f"BENCH_NOOP_BROKER must be 'bare' or 'ours', not {kind!r}")


_built: dict[str, dramatiq.Broker] = {}


def __getattr__(name: str) -> Any:
    """``broker``, built from the environment on first access (the Dramatiq CLI's import)."""
    if name != "broker":
        raise AttributeError(name)
    if "broker" not in _built:
        _built["broker"] = _from_env()
    return _built["broker"]
