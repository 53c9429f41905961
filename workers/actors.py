"""The actor toolkit: what an actor receives, its default options, and the catalogue's shape.

An actor is a plain module-level coroutine function of a concern module (``workers/search.py``,
...), ``async def index_task(ctx: ActorContext, event: TaskEvent) -> None``; its name is the
Dramatiq actor name. The catalogue (``workers/catalogue.py``, a :class:`Catalogue`) lists the
actors with their queue and options, routes event types to them and names the actor of each
scheduled job. :func:`workers.broker.build_broker` checks it (:meth:`Catalogue.check`) and
declares its actors on the broker it builds (:func:`declare_actors`); tests can build several.

The first argument after ``ctx`` is converted once, before the function runs: annotated with
event payload models (``core/events.py``), the message's event is parsed into its type's model
and must be one of them; annotated with another pydantic model, it is validated into it; other
arguments arrive as sent. A message that does not fit fails permanently (dead-lettered).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import types
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import dramatiq
import structlog
from pydantic import BaseModel

from config.settings import Settings
from core import events
from core.context import Context
from core.errors import Invalid, NotFound
from core.events import EventPayload, EventType
from core.mail import Mailer
from workers.resources import WorkerResources

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
#: Options whose value names another actor.
_ACTOR_OPTIONS = ("on_retry_exhausted", "on_success", "on_failure")


@dataclass
class ActorContext(Context):
    """What an actor works with: the domain :class:`~core.context.Context` (store, Redis,
    settings), the mailer, and the broker it runs on."""

    mailer: Mailer = field(kw_only=True)
    broker: dramatiq.Broker = field(kw_only=True)

    @classmethod
    def of(cls, ctx: Context, mailer: Mailer, broker: dramatiq.Broker) -> ActorContext:
        """An actor context over ``ctx``'s clients."""
        return cls(ctx.settings, ctx.store, ctx.redis, mailer=mailer, broker=broker)

    async def send(self, actor: ActorFn, *args: Any) -> None:
        """Enqueue a message of ``actor`` (a function of the catalogue) on this broker, on a
        thread: Dramatiq's send is synchronous I/O, never run on the event loop."""
        await asyncio.to_thread(self.broker.get_actor(actor.__name__).send, *args)


def bind_event(event: EventPayload) -> None:
    """Carry the request id and user id of the originating request into this message's logs."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(
        request_id=event.request_id, user_id=event.user_id, event_id=event.id
    )


@dataclass(frozen=True)
class ActorSpec:
    """One actor of the catalogue: its function, its queue, its Dramatiq options (over
    :data:`DEFAULTS`) and, with ``configure``, options read from the settings."""

    fn: ActorFn
    queue: str
    options: Mapping[str, Any] = field(default_factory=dict)
    configure: Callable[[Settings], Mapping[str, Any]] | None = None

    @property
    def name(self) -> str:
        """The actor's name: its function's."""
        return self.fn.__name__

    def all_options(self, settings: Settings) -> dict[str, Any]:
        """The options it is declared with."""
        extra = self.configure(settings) if self.configure is not None else {}
        return {**DEFAULTS, **self.options, **extra}


class CatalogueError(Exception):
    """The catalogue is inconsistent; the message names every problem."""


@dataclass(frozen=True)
class Catalogue:
    """The actors, the event types each feeds (``routes``) and the actor each scheduled job
    runs (``schedule``, by job name: ``jobs/schedule.py``)."""

    actors: tuple[ActorSpec, ...]
    routes: Mapping[EventType, tuple[str, ...]]
    schedule: Mapping[str, str]

    def actors_for(self, event_type: str) -> tuple[str, ...]:
        """The actor names an event type is delivered to (none for an unknown type)."""
        try:
            return self.routes.get(EventType(event_type), ())
        except ValueError:
            return ()

    def problems(self) -> list[str]:
        """What is wrong with the catalogue, one message per problem (none when sound)."""
        found: list[str] = []
        specs: dict[str, ActorSpec] = {}
        for spec in self.actors:
            if spec.name in specs:
                found.append(f"actor {spec.name!r} is declared twice")
            specs[spec.name] = spec
        for spec in self.actors:
            for option in _ACTOR_OPTIONS:
                target = spec.options.get(option)
                if target is not None and target not in specs:
                    found.append(
                        f"actor {spec.name!r} has {option}={target!r}, which is not a declared "
                        "actor"
                    )
        for key in self.routes:
            if key not in set(EventType):
                found.append(f"events of type {key!r} are routed, but it is not an event type")
        for event_type in EventType:
            names = self.routes.get(event_type, ())
            if not names:
                found.append(f"event type {event_type.value!r} is not routed to any actor")
            payload = events.PAYLOADS[event_type]
            for name in names:
                if name not in specs:
                    found.append(
                        f"event type {event_type.value!r} is routed to {name!r}, which is not "
                        "a declared actor"
                    )
                elif not issubclass(payload, _event_models(specs[name].fn) or ()):
                    found.append(
                        f"event type {event_type.value!r} is routed to {name!r}, which does "
                        f"not take {payload.__name__}"
                    )
        for job, name in self.schedule.items():
            if name not in specs:
                found.append(f"scheduled job {job!r} runs {name!r}, which is not a declared actor")
        return found

    def check(self) -> None:
        """Raise :class:`CatalogueError` naming every problem, if any."""
        found = self.problems()
        if found:
            raise CatalogueError(
                "the actor catalogue (workers/catalogue.py) is inconsistent: " + "; ".join(found)
            )


def declare_actors(
    broker: dramatiq.Broker, res: WorkerResources, catalogue: Catalogue
) -> dict[str, dramatiq.Actor[Any, Any]]:
    """Declare the actors of ``catalogue`` (checked: :func:`workers.broker.build_broker` does)
    on ``broker``; returns them by name."""
    contexts = _Contexts(res, broker)
    return {
        spec.name: dramatiq.actor(  # type: ignore[call-overload]
            _bind(spec.fn, contexts),
            actor_name=spec.name,
            queue_name=spec.queue,
            broker=broker,
            **spec.all_options(res.settings),
        )
        for spec in catalogue.actors
    }


class _Contexts:
    """One :class:`ActorContext` per worker context (made again when the resources reopen)."""

    def __init__(self, res: WorkerResources, broker: dramatiq.Broker):
        self.res = res
        self.broker = broker
        self._made: ActorContext | None = None

    async def get(self) -> ActorContext:
        base = await self.res.context()
        made = self._made
        if made is None or made.store is not base.store:
            made = self._made = ActorContext.of(base, self.res.mailer, self.broker)
        return made


def _first_argument(fn: ActorFn) -> Any:
    """The annotation of ``fn``'s argument after ``ctx`` (``None`` when it has none)."""
    params = list(inspect.signature(fn).parameters)
    if len(params) < 2:
        return None
    return typing.get_type_hints(fn).get(params[1])


def _event_models(fn: ActorFn) -> tuple[type[EventPayload], ...] | None:
    """The event payload models ``fn`` takes (its annotation, or the members of a union), or
    ``None`` when it takes no event."""
    hint = _first_argument(fn)
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    members = typing.get_args(hint) if union else (hint,)
    if all(isinstance(m, type) and issubclass(m, EventPayload) for m in members):
        return tuple(members)
    return None


def _bind(fn: ActorFn, contexts: _Contexts) -> ActorFn:
    """The function Dramatiq runs: converts the first argument (see the module docstring),
    then calls ``fn`` with the actor context."""
    accepted = _event_models(fn)
    hint = _first_argument(fn)
    model = hint if isinstance(hint, type) and issubclass(hint, BaseModel) else None

    async def run(*args: Any, **kwargs: Any) -> None:
        if args and accepted is not None:
            if not isinstance(args[0], Mapping):
                raise TypeError(f"{fn.__name__} takes an event, not {type(args[0]).__name__}")
            event = events.parse(args[0])
            if not isinstance(event, accepted):
                raise TypeError(f"{fn.__name__} does not take {event.type} events")
            bind_event(event)
            args = (event, *args[1:])
        elif args and model is not None:
            args = (model.model_validate(args[0]), *args[1:])
        await fn(await contexts.get(), *args, **kwargs)

    return functools.update_wrapper(run, fn)
