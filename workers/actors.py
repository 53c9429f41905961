"""Actors, grouped by concern. Each receives a plain-JSON event and is safe to run twice.

Actors are declared on a broker by :func:`declare_actors` rather than at import time, so the
broker is built in exactly one place (:mod:`workers.broker`) and tests can build several.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import dramatiq
import structlog

from core import notifications
from core.errors import Invalid, NotFound
from workers.resources import WorkerResources

Event = dict[str, Any]
ActorFn = Callable[[Event], Awaitable[None]]

#: Failures that retrying cannot fix: the message goes to the dead-letter queue at once.
PERMANENT = (NotFound, Invalid, KeyError, TypeError, ValueError)

#: Default options: exponential backoff from 1 s to 5 min, 10 retries, 60 s time limit.
DEFAULTS: dict[str, Any] = {
    "max_retries": 10,
    "min_backoff": 1_000,
    "max_backoff": 300_000,
    "time_limit": 60_000,
    "throws": PERMANENT,
}


def _bound(event: Event) -> None:
    """Carry the request id and user id of the originating request into this message's logs."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(
        request_id=event.get("request_id"), user_id=event.get("user_id"), event_id=event.get("id")
    )


def declare_actors(
    broker: dramatiq.Broker, res: WorkerResources
) -> dict[str, dramatiq.Actor[Any, Any]]:
    """Declare every actor on ``broker``; returns them by name."""
    specs: list[tuple[str, str, ActorFn]] = []

    async def send_welcome_email(event: Event) -> None:
        """Welcome a newly registered user by email."""
        _bound(event)
        ctx = await res.context()
        await notifications.send_welcome(ctx, res.mailer, event["user_id"])

    specs.append(("notifications", "send_welcome_email", send_welcome_email))

    actors: dict[str, dramatiq.Actor[Any, Any]] = {}
    for queue, name, fn in specs:
        actors[name] = dramatiq.actor(  # type: ignore[call-overload]
            fn, actor_name=name, queue_name=queue, broker=broker, **DEFAULTS
        )
    return actors
