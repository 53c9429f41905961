"""Actor plumbing shared by every concern: defaults, context binding, declaration.

Each concern lives in its own module (``workers/notifications.py``, ...) exposing
``declare(declare_one)``; actors are declared on a broker by :func:`declare_actors` rather than
at import time, so the broker is built in exactly one place (:mod:`workers.broker`) and tests
can build several.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import dramatiq
import structlog

from core.errors import Invalid, NotFound
from workers.resources import WorkerResources

Event = dict[str, Any]
ActorFn = Callable[..., Awaitable[None]]

#: Failures that retrying cannot fix: the message goes to the dead-letter queue at once.
#: Sentry's Dramatiq integration skips these (``throws``); the dead-letter middleware
#: (workers/dead_letter_notes.py) reports the unexpected ones: malformed messages, bugs.
PERMANENT = (NotFound, Invalid, KeyError, TypeError, ValueError)
#: Permanent outcomes that are part of normal operation (not reported to Sentry).
EXPECTED = (NotFound, Invalid)

#: Default options: exponential backoff from 1 s to 5 min, 10 retries, 60 s time limit.
DEFAULTS: dict[str, Any] = {
    "max_retries": 10,
    "min_backoff": 1_000,
    "max_backoff": 300_000,
    "time_limit": 60_000,
    "throws": PERMANENT,
}


def bind_event(event: Event) -> None:
    """Carry the request id and user id of the originating request into this message's logs."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(
        request_id=event.get("request_id"), user_id=event.get("user_id"), event_id=event.get("id")
    )


class DeclareOne(Protocol):
    """Declares one actor: ``declare_one(queue, fn, **options)``; the actor name is the
    function's name."""

    def __call__(self, queue: str, fn: ActorFn, **options: Any) -> None: ...


def declare_actors(
    broker: dramatiq.Broker, res: WorkerResources
) -> dict[str, dramatiq.Actor[Any, Any]]:
    """Declare every actor of every concern on ``broker``; returns them by name."""
    from workers import analytics, cache, maintenance, notifications, search, webhooks

    actors: dict[str, dramatiq.Actor[Any, Any]] = {}

    def declare_one(queue: str, fn: ActorFn, **options: Any) -> None:
        name = fn.__name__
        if name in actors:
            raise ValueError(f"actor {name} declared twice")
        actors[name] = dramatiq.actor(  # type: ignore[call-overload]
            fn, actor_name=name, queue_name=queue, broker=broker, **{**DEFAULTS, **options}
        )

    for concern in (notifications, cache, search, webhooks, maintenance, analytics):
        concern.declare(declare_one, res)
    return actors
