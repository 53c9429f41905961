"""What every queue inspector shares: the figures and dead letters it answers, the errors of the
queue backends, and :class:`QueueInspector`, the interface the Redis
(:mod:`workers.queue_admin`) and RabbitMQ (:mod:`workers.queue_admin_rabbitmq`) inspectors
implement. Synchronous: the web layer runs every call on a thread.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis
from dramatiq.common import q_name
from dramatiq.message import Message

from core.errors import AppError, NotFound
from core.pagination import CursorCodec
from workers.dead_letter_notes import error_summary
from workers.pause import PauseStore
from workers.queue_messages import MessageDetail, MessagePage, ours_first
from workers.registry import _now_ms, _utc


def backend_errors() -> tuple[type[Exception], ...]:
    """Errors of the queue backends; the web layer answers 503 for them. pika's count only
    once it is imported: only a RabbitMQ broker imports it (a Redis deployment's processes
    never load its 27 modules), and until then none of its errors can be raised."""
    pika_exceptions = sys.modules.get("pika.exceptions")
    if pika_exceptions is None:
        return (redis.RedisError,)
    return (redis.RedisError, pika_exceptions.AMQPError)


#: Options that describe one delivery attempt, dropped when a dead letter is replayed.
ATTEMPT_OPTIONS = frozenset(
    {
        "retries",
        "traceback",
        "requeue_timestamp",
        "redis_message_id",
        "eta",
        "dead_letter_error",
    }
)


class Unsupported(AppError, status=501, title="Not Implemented", slug="not-implemented"):
    """The broker cannot do this (RabbitMQ: reading ready or delayed messages) (501)."""


@dataclass(frozen=True)
class QueueStats:
    """Where the messages of one queue are.

    ``in_progress`` counts messages fetched by a worker and not yet acked (running or
    prefetched); ``oldest_age_seconds`` is how long the next message to be taken has waited
    since it was enqueued (or last retried): 0 for an empty queue. ``None``: the broker does
    not report it.
    """

    queue: str
    ready: int
    delayed: int
    in_progress: int | None
    dead: int
    oldest_age_seconds: float | None
    #: ``None``: the paused set (in ``REDIS_URL``'s Redis) could not be read.
    paused: bool | None = False


@dataclass(frozen=True)
class DeadMessage:
    """One dead-lettered message."""

    id: str
    message_id: str
    queue: str
    actor: str
    args: list[Any]
    kwargs: dict[str, Any]
    enqueued_at: datetime
    failed_at: datetime | None
    retries: int
    error: str | None
    traceback: str | None


@dataclass(frozen=True)
class DeadPage:
    """One page of a dead-letter queue, oldest first."""

    items: list[DeadMessage]
    next_cursor: str | None


@dataclass(frozen=True)
class RetryResult:
    """What a replay did: how many went back to the queue, which ids were not there."""

    retried: int
    not_found: list[str]
    #: The replayed copies' ids (Redis), in the order of the replay.
    new_ids: list[str] = field(default_factory=list)


def dead_message(
    queue: str, rid: str, score: float | None, raw: bytes, note: dict[str, Any] | None = None
) -> DeadMessage:
    message = Message.decode(raw)
    options = {**message.options, **(note or {})}
    tb = options.get("traceback")
    return DeadMessage(
        id=rid,
        message_id=message.message_id,
        queue=queue,
        actor=message.actor_name,
        args=list(message.args),
        kwargs=dict(message.kwargs),
        enqueued_at=_utc(message.message_timestamp),
        failed_at=_utc(score) if score is not None else None,
        retries=int(options.get("retries", 0)),
        error=options.get("dead_letter_error") or error_summary(None, tb),
        traceback=tb,
    )


def matches(item: DeadMessage, actor: str | None, error: str | None) -> bool:
    """Whether a dead letter passes the list's filters: ``actor`` exactly, ``error`` as a
    case-insensitive substring of its error or traceback."""
    if actor is not None and item.actor != actor:
        return False
    if error:
        needle = error.lower()
        return needle in (item.error or "").lower() or needle in (item.traceback or "").lower()
    return True


def dead_detail(item: DeadMessage, options: dict[str, Any]) -> MessageDetail:
    """The detail of a dead letter, its traceback with our frames first."""
    return MessageDetail(
        id=item.id,
        message_id=item.message_id,
        queue=item.queue,
        actor=item.actor,
        state="dead",
        enqueued_at=item.enqueued_at,
        eta=None,
        retries=item.retries,
        args=item.args,
        kwargs=item.kwargs,
        options={k: v for k, v in options.items() if k != "traceback"},
        error=item.error,
        traceback=ours_first(item.traceback),
        failed_at=item.failed_at,
    )


def replay_copy(
    message: Message[Any], queue: str, redis_message_id: str | None = None
) -> Message[Any]:
    """A fresh copy of a dead message for ``queue``: same id, actor and arguments, attempt
    state (retries, traceback, delay) reset and timestamped now, so age limits and the
    latency reading count from the replay."""
    options = {k: v for k, v in message.options.items() if k not in ATTEMPT_OPTIONS}
    if redis_message_id is not None:
        options["redis_message_id"] = redis_message_id
    return Message(
        queue_name=queue,
        actor_name=message.actor_name,
        args=message.args,
        kwargs=message.kwargs,
        options=options,
        message_id=message.message_id,
        message_timestamp=_now_ms(),
    )


class QueueInspector:
    """Reads and manages a broker's queues (base: every method raises)."""

    #: Which broker this inspects (``redis`` or ``rabbitmq``).
    kind = "none"

    def __init__(
        self, queues: Iterable[str], cursors: CursorCodec, pauses: PauseStore | None = None
    ):
        self.queues = sorted(q_name(q) for q in queues)
        #: Signs the dead-letter lists' cursors (scope ``dead:<queue>``), as every list's.
        self.cursors = cursors
        #: The paused queues (workers.pause); ``None``: pausing is not available.
        self.pauses = pauses

    def check(self, queue: str) -> str:
        """``queue`` if it is one of ours, else :class:`NotFound`."""
        if queue not in self.queues:
            raise NotFound(f"No queue named {queue!r}")
        return queue

    def stats(self) -> list[QueueStats]:
        """Counts and latency of every queue."""
        raise NotImplementedError

    def dead(
        self,
        queue: str,
        *,
        limit: int = 50,
        cursor: str | None = None,
        actor: str | None = None,
        error: str | None = None,
    ) -> DeadPage:
        """A page of ``queue``'s dead letters, oldest first; only those of ``actor``, and
        those whose error or traceback contains ``error`` (any case), when given."""
        raise NotImplementedError

    def dead_detail(self, queue: str, rid: str) -> MessageDetail:
        """One dead letter with its traceback, our frames first (:class:`NotFound`)."""
        raise Unsupported("This broker cannot show a dead letter")

    def delete_dead(self, queue: str, rid: str) -> None:
        """Drop one dead letter (:class:`NotFound` when it is not there)."""
        raise Unsupported("This broker cannot delete one dead letter")

    def messages(
        self, queue: str, state: str = "ready", *, limit: int = 50, cursor: str | None = None
    ) -> MessagePage:
        """A page of ``queue``'s ``ready`` (next taken first) or ``delayed`` (soonest first)
        messages."""
        raise Unsupported(f"The {self.kind} broker cannot list waiting messages")

    def find(self, wanted: str) -> MessageDetail:
        """A message by id in every queue and state (:class:`NotFound`)."""
        raise Unsupported(f"The {self.kind} broker cannot look messages up")

    def retry_message(self, queue: str, rid: str) -> str:
        """Retry now: a ready or delayed message to the head of the ready list, a dead one
        replayed; returns its id afterwards. :class:`NotFound`, or :class:`Conflict` when a
        worker has it."""
        raise Unsupported(f"The {self.kind} broker cannot move one message")

    def delete_message(self, queue: str, rid: str) -> None:
        """Delete one ready, delayed or dead message (:class:`Conflict` when in progress)."""
        raise Unsupported(f"The {self.kind} broker cannot delete one message")

    def paused(self) -> set[str]:
        """The paused queues."""
        return self.pauses.paused() if self.pauses is not None else set()

    def paused_for_stats(self) -> Callable[[str], bool | None]:
        """Whether each queue is paused, for :meth:`stats`: ``None`` for all when the paused
        set cannot be read (the counts, from the broker, are still answered)."""
        try:
            paused = self.paused()
        except redis.RedisError:
            return lambda _queue: None
        return lambda queue: queue in paused

    def set_paused(self, queue: str, paused: bool) -> bool:
        """Pause or resume ``queue`` (workers read it within a second); whether it changed."""
        self.check(queue)
        if self.pauses is None:
            raise Unsupported("Pausing needs Redis")
        return self.pauses.set(queue, paused)

    def retry(self, queue: str, ids: list[str] | None = None) -> RetryResult:
        """Put dead letters (all, or those ``ids``) back on ``queue`` as fresh messages.

        Safe to run twice: a dead letter is removed and re-enqueued in one step, so a second
        run finds it gone (reported in ``not_found``).
        """
        raise NotImplementedError

    def purge(self, queue: str) -> int:
        """Drop every dead letter of ``queue``; returns how many."""
        raise NotImplementedError
