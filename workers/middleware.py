"""Worker middleware carrying the originating request's context into each message.

Messages built from events (and scheduled runs) carry ``request_id`` and ``user_id`` in their
first argument. Before a message is processed they are bound to the log context of the worker
thread and set on the Sentry scope, so an actor failure reported by Sentry's Dramatiq
integration names the request and user that caused it. (Async actors bind the same context
again on the event-loop thread: see :func:`workers.actors.bind_event`.)

:class:`OutboxReceipts` records on each outbox event which of its messages finished (see
``core/events.py``, receipts), so the relay's sweep can send again the ones a broker lost.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import dramatiq
import structlog
from bson import ObjectId
from dramatiq.asyncio import get_event_loop_thread
from dramatiq.broker import MessageProxy
from dramatiq.common import q_name
from pymongo import UpdateOne
from pymongo.errors import PyMongoError

from config.logging import get_logger
from config.sentry import tag_scope
from core import events
from core.store import Doc, utcnow
from workers.catalogue import CATALOGUE
from workers.hooks import OutcomeMiddleware
from workers.resources import WorkerResources

log = get_logger(__name__)


class MessageContext(OutcomeMiddleware):
    """Bind request id, user id and message id for the duration of one message."""

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        """Bind the context of the message about to run."""
        payload = message.args[0] if message.args and isinstance(message.args[0], dict) else {}
        context = {
            "request_id": payload.get("request_id"),
            "user_id": payload.get("user_id"),
            "event_id": payload.get("id"),
            "message_id": message.message_id,
            "actor": message.actor_name,
        }
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(**context)
        # Without SENTRY_DSN this is one dict lookup (the scope work was ~4 % of a no-op
        # message's CPU).
        tag_scope(context)

    def message_ended(
        self, broker: dramatiq.Broker, message: MessageProxy, exception: BaseException | None
    ) -> None:
        """Forget the context once the message is done."""
        structlog.contextvars.clear_contextvars()

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        """Forget the context of a skipped message."""
        structlog.contextvars.clear_contextvars()


#: The message option naming the outbox entry a follow-up message fulfils: ``[event id, key]``.
OUTBOX_OPTION = "outbox"
#: Options of one delivery attempt, not stored with a follow-up's body.
_ATTEMPT_OPTIONS = frozenset(
    {"retries", "traceback", "requeue_timestamp", "redis_message_id", "eta", "dead_letter_error"}
)


@dataclass
class _Tracked:
    """The outbox entry the message being processed fulfils, and what became of it."""

    event_id: ObjectId
    key: str
    actor: str
    message_id: str
    #: A follow-up message (stored with its receipt if it is retried); ``None`` for a routed
    #: pair, whose message the relay rebuilds from the event.
    follow_up: MessageProxy | None
    outcome: Literal["finished", "retrying"] | None = None
    retry_delay_ms: int = 0
    retries: int = 0
    follow_ups: list[events.Expected] = field(default_factory=list)


#: The tracked message being processed in this context: set on the worker thread before the
#: actor runs and copied, as every context variable, into the event loop's task of an async
#: actor and into ``asyncio.to_thread`` calls, so the messages the actor sends are seen as its
#: follow-ups wherever they are sent from.
_CURRENT: contextvars.ContextVar[_Tracked | None] = contextvars.ContextVar(
    "outbox_tracked", default=None
)


def stored_body(message: dramatiq.Message[Any] | MessageProxy) -> str:
    """A message's encoded body as stored for a resend: its own queue (not the delay queue),
    without the options of one delivery attempt."""
    clean: dramatiq.Message[Any] = dramatiq.Message(
        queue_name=q_name(message.queue_name),
        actor_name=message.actor_name,
        args=message.args,
        kwargs=message.kwargs,
        options={k: v for k, v in message.options.items() if k not in _ATTEMPT_OPTIONS},
        message_id=message.message_id,
        message_timestamp=message.message_timestamp,
    )
    return clean.encode().decode()


class OutboxReceipts(OutcomeMiddleware):
    """Records which messages of outbox events finished (``core/events.py``, receipts).

    A message is tracked when it carries the :data:`OUTBOX_OPTION` (a follow-up, or a resent
    one) or when its first argument is an event (``id`` and ``type``) routed to its actor (a
    routed pair, as the relay sends it). When it has been processed, just before it is acked or
    rejected, one update is queued for its event:

    - succeeded, skipped or dead-lettered (a permanent failure, or retries exhausted: then an
      operator's matter) → its key is added to ``finished``;
    - retried → its entry is due ``retry eta + OUTBOX_REDELIVER_AFTER_S`` (skipped when the
      due this process recorded last is still at least half the bound ahead of that, so a
      message deferred every second costs one write per half bound, not one per deferral);
    - neither (it failed and its retry could not be enqueued: the broker is down) → nothing:
      it is due as recorded, and the sweep sends it again;
    - every message the actor sent meanwhile (and that the broker took) is recorded as awaited,
      with its body, due ``OUTBOX_REDELIVER_AFTER_S`` after its eta.

    The updates are written in unordered bulk writes on the worker's event loop, about every
    :attr:`flush_delay` seconds and at shutdown, one per event (the receipts of its actors
    that finished since the last flush merged: ``events.merge_receipts``); the worker never
    waits for them. A receipt that is lost (MongoDB unreachable, the process killed before a
    flush) only makes the sweep send its message again, which the actors' dedupe absorbs.
    """

    #: At most this many recorded retry dues are remembered (per process).
    ALIVE_CACHE = 10_000
    #: At most this many receipts wait for a flush; beyond, the oldest are dropped (logged).
    MAX_PENDING = 50_000

    def __init__(self, resources: WorkerResources, *, flush_delay: float = 0.05) -> None:
        self.resources = resources
        self.bound = timedelta(seconds=resources.settings.outbox_redeliver_after_s)
        self.flush_delay = flush_delay
        self._lock = threading.Lock()
        self._pending: list[tuple[ObjectId, Doc]] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._alive: OrderedDict[tuple[ObjectId, str], datetime] = OrderedDict()

    # --- which message is tracked, and what became of it ---------------------------------------

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        """Note the outbox entry this message fulfils, if any."""
        _CURRENT.set(self._identify(message))

    def message_ended(
        self, broker: dramatiq.Broker, message: MessageProxy, exception: BaseException | None
    ) -> None:
        """A message that ran without an exception has finished."""
        tracked = _CURRENT.get()
        if tracked is not None and exception is None:
            tracked.outcome = "finished"

    def after_skip_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        """A skipped message will not run: finished, as far as the outbox is concerned."""
        tracked = _CURRENT.get()
        if tracked is not None:
            tracked.outcome = "finished"

    def before_enqueue(
        self, broker: dramatiq.Broker, message: dramatiq.Message[Any], delay: int | None
    ) -> None:
        """Tag a message sent while a tracked message is processed as its follow-up."""
        tracked = _CURRENT.get()
        if tracked is None or message.message_id == tracked.message_id:
            return
        if OUTBOX_OPTION not in message.options:
            key = events.awaited_key(message.actor_name, message.message_id)
            message.options[OUTBOX_OPTION] = [str(tracked.event_id), key]

    def after_enqueue(
        self, broker: dramatiq.Broker, message: dramatiq.Message[Any], delay: int | None
    ) -> None:
        """Note the tracked message's retry, or a follow-up the broker took."""
        tracked = _CURRENT.get()
        if tracked is None:
            return
        if message.message_id == tracked.message_id:
            if delay is not None:  # the Retries middleware re-enqueued it
                tracked.outcome = "retrying"
                tracked.retry_delay_ms = delay
                tracked.retries = int(message.options.get("retries", 0))
            return
        tag = message.options.get(OUTBOX_OPTION)
        if not (isinstance(tag, list) and len(tag) == 2 and tag[0] == str(tracked.event_id)):
            return
        due = utcnow() + timedelta(milliseconds=delay or 0) + self.bound
        tracked.follow_ups.append(
            events.Expected(str(tag[1]), message.actor_name, due, message=stored_body(message))
        )

    def before_ack(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        """Record the outcome of a processed message (succeeded, retried, or unknown)."""
        self._settle()

    def before_nack(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        """A rejected (dead-lettered) message has finished."""
        tracked = _CURRENT.get()
        if tracked is not None:
            tracked.outcome = "finished"
        self._settle()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """Write the receipts still queued. ``after_*`` hooks run in reverse order of the
        middleware, and this one is added last: it runs while the event loop and the MongoDB
        client are still open."""
        thread = get_event_loop_thread()
        if thread is not None:
            try:
                thread.run_coroutine(self.flush())
            except Exception:
                log.warning("outbox.receipts_unflushed", exc_info=True)

    @staticmethod
    def _identify(message: MessageProxy) -> _Tracked | None:
        tag = message.options.get(OUTBOX_OPTION)
        if isinstance(tag, list) and len(tag) == 2 and ObjectId.is_valid(tag[0]):
            return _Tracked(
                ObjectId(tag[0]), str(tag[1]), message.actor_name, message.message_id, message
            )
        payload = message.args[0] if message.args and isinstance(message.args[0], dict) else {}
        event_id, event_type = payload.get("id"), payload.get("type")
        if (
            isinstance(event_id, str)
            and isinstance(event_type, str)
            and ObjectId.is_valid(event_id)
            and message.actor_name in CATALOGUE.actors_for(event_type)
        ):
            return _Tracked(
                ObjectId(event_id),
                events.awaited_key(message.actor_name),
                message.actor_name,
                message.message_id,
                None,
            )
        return None

    def _settle(self) -> None:
        tracked = _CURRENT.get()
        if tracked is None:
            return
        # Once: a failed ack is retried by Dramatiq, calling ``before_ack`` again.
        _CURRENT.set(None)
        finished: list[str] = []
        expected = list(tracked.follow_ups)
        slot = (tracked.event_id, tracked.key)
        if tracked.outcome == "finished":
            finished.append(tracked.key)
            with self._lock:
                self._alive.pop(slot, None)
        elif tracked.outcome == "retrying":
            due = utcnow() + timedelta(milliseconds=tracked.retry_delay_ms) + self.bound
            if self._note_alive(slot, due):
                body = None if tracked.follow_up is None else stored_body(tracked.follow_up)
                expected.append(
                    events.Expected(
                        tracked.key, tracked.actor, due, message=body, retries=tracked.retries
                    )
                )
        if finished or expected:
            self._submit(tracked.event_id, events.receipt(finished, expected))

    def _note_alive(self, slot: tuple[ObjectId, str], due: datetime) -> bool:
        """Whether a retry due ``due`` is worth writing (see the class docstring)."""
        with self._lock:
            recorded = self._alive.get(slot)
            if recorded is not None and due - recorded <= self.bound / 2:
                return False
            self._alive[slot] = due
            self._alive.move_to_end(slot)
            while len(self._alive) > self.ALIVE_CACHE:
                self._alive.popitem(last=False)
            return True

    # --- writing the receipts ------------------------------------------------------------------

    def _submit(self, event_id: ObjectId, update: Doc) -> None:
        with self._lock:
            self._pending.append((event_id, update))
            dropped = len(self._pending) - self.MAX_PENDING
            if dropped > 0:
                del self._pending[:dropped]
                log.warning("outbox.receipts_dropped", count=dropped)
            if self._scheduled:
                return
            self._scheduled = True
        thread = get_event_loop_thread()
        if thread is None:  # no AsyncIO middleware: nothing can write them
            with self._lock:
                self._pending.clear()
                self._scheduled = False
            log.warning("outbox.receipts_unwritable", reason="no event loop thread")
            return
        thread.loop.call_soon_threadsafe(self._spawn)

    def _spawn(self) -> None:
        task = asyncio.get_running_loop().create_task(self._flush_later())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush_later(self) -> None:
        await asyncio.sleep(self.flush_delay)
        await self.flush()

    async def flush(self) -> None:
        """Write the queued receipts now (on the worker's event loop)."""
        with self._lock:
            receipts, self._pending = self._pending, []
            self._scheduled = False
        if not receipts:
            return
        # One update per event: the receipts of its actors that finished since the last flush,
        # merged (core/events.py), so the event is rewritten once, not once per actor.
        by_event: dict[ObjectId, list[Doc]] = {}
        for event_id, update in receipts:
            by_event.setdefault(event_id, []).append(update)
        ops = [
            UpdateOne({"_id": event_id}, events.merge_receipts(updates))
            for event_id, updates in by_event.items()
        ]
        try:
            ctx = await self.resources.context()
            for start in range(0, len(ops), 1000):
                await ctx.store["events"].bulk_write(ops[start : start + 1000], ordered=False)
        except PyMongoError as exc:
            # Their messages are sent again after the bound; the actors dedupe.
            log.warning("outbox.receipts_lost", count=len(receipts), error=str(exc))
