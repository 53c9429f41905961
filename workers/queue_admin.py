"""Queue operations: per-queue counts and latency, and the dead-letter queue (list, replay,
purge). Why a message died is recorded by :mod:`workers.dead_letter_notes`; the registry of live
workers is :mod:`workers.registry`.

Everything here is synchronous (Redis and pika clients); the web layer runs it on a thread.

Dramatiq's Redis broker keeps, under its namespace ``ns`` (``{REDIS_PREFIX}dramatiq``) and for
a queue ``q`` (see ``dramatiq/brokers/redis/dispatch.lua``):

- ``ns:q`` — LIST of ready message ids; ``enqueue`` RPUSHes, ``fetch`` LPOPs, so index 0 is
  the next message a worker takes;
- ``ns:q.msgs`` — HASH id → message of every message not yet acked: the ready ones plus the
  ones fetched by a worker (whose ids sit in ``ns:__acks__.<worker>.q``);
- ``ns:q.DQ`` / ``ns:q.DQ.msgs`` — the same for delayed messages (retries with backoff,
  ``send_with_options(delay=...)``); workers fetch them eagerly and hold them until due;
- ``ns:q.XQ`` — ZSET of dead-lettered ids scored by the time (ms) they died, bodies in
  ``ns:q.XQ.msgs``; Dramatiq drops them after ``dead_message_ttl`` (7 days).

For RabbitMQ only the counts Dramatiq's queues report are available (ready, delayed, dead);
listing and replaying dead letters works by fetching them and returning the rest.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import dramatiq
import pika  # type: ignore[import-untyped]
import pika.exceptions  # type: ignore[import-untyped]
import redis
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import dq_name, q_name, xq_name
from dramatiq.errors import DecodeError
from dramatiq.message import Message

from config.connections import Connections
from core.errors import NotFound
from core.pagination import CursorCodec
from workers.dead_letter_notes import error_summary, note_key
from workers.registry import _now_ms, _utc

#: Errors of the queue backends; the web layer answers 503 for them.
BACKEND_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, pika.exceptions.AMQPError)

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


def _dead_message(
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

    def __init__(self, queues: Iterable[str], cursors: CursorCodec):
        self.queues = sorted(q_name(q) for q in queues)
        #: Signs the dead-letter lists' cursors (scope ``dead:<queue>``), as every list's.
        self.cursors = cursors

    def check(self, queue: str) -> str:
        """``queue`` if it is one of ours, else :class:`NotFound`."""
        if queue not in self.queues:
            raise NotFound(f"No queue named {queue!r}")
        return queue

    def stats(self) -> list[QueueStats]:
        """Counts and latency of every queue."""
        raise NotImplementedError

    def dead(self, queue: str, *, limit: int = 50, cursor: str | None = None) -> DeadPage:
        """A page of ``queue``'s dead letters, oldest first."""
        raise NotImplementedError

    def retry(self, queue: str, ids: list[str] | None = None) -> RetryResult:
        """Put dead letters (all, or those ``ids``) back on ``queue`` as fresh messages.

        Safe to run twice: a dead letter is removed and re-enqueued in one step, so a second
        run finds it gone (reported in ``not_found``).
        """
        raise NotImplementedError

    def purge(self, queue: str) -> int:
        """Drop every dead letter of ``queue``; returns how many."""
        raise NotImplementedError


# -- Redis -------------------------------------------------------------------------------------

# KEYS per queue: ready list, messages hash, delayed messages hash, dead-letter zset.
_STATS_LUA = """
local out = {}
for i = 1, #KEYS, 4 do
    local head = redis.call("lindex", KEYS[i], 0)
    local body = false
    if head then
        body = redis.call("hget", KEYS[i + 1], head)
    end
    out[#out + 1] = {
        redis.call("llen", KEYS[i]),
        redis.call("hlen", KEYS[i + 1]),
        redis.call("hlen", KEYS[i + 2]),
        redis.call("zcard", KEYS[i + 3]),
        body,
    }
end
return out
"""

# KEYS: dead zset, dead hash, ready list, messages hash; ARGV: dead id, new id, new body.
# Removing the dead letter and enqueueing its copy in one script makes a replay atomic: a
# crash cannot lose it, a concurrent or repeated replay cannot enqueue it twice.
_RETRY_LUA = """
if redis.call("zrem", KEYS[1], ARGV[1]) == 0 then
    return 0
end
redis.call("hdel", KEYS[2], ARGV[1])
if ARGV[3] ~= "" then
    redis.call("hset", KEYS[4], ARGV[2], ARGV[3])
    redis.call("rpush", KEYS[3], ARGV[2])
    return 1
end
return 0
"""


class RedisQueueInspector(QueueInspector):
    """Reads Dramatiq's Redis keys directly (see the module docstring for their layout)."""

    kind = "redis"

    def __init__(
        self, client: redis.Redis, namespace: str, queues: Iterable[str], cursors: CursorCodec
    ):
        super().__init__(queues, cursors)
        # Typed loosely: redis-py's reply types are unions over every response decoding.
        self.client: Any = client
        self.namespace = namespace
        self._stats = client.register_script(_STATS_LUA)
        self._retry = client.register_script(_RETRY_LUA)

    def key(self, name: str) -> str:
        """The Redis key of a broker structure (``q``, ``q.msgs``, ``q.XQ``, ...)."""
        return f"{self.namespace}:{name}"

    def stats(self) -> list[QueueStats]:
        keys: list[str] = []
        for q in self.queues:
            keys += [self.key(q), self.key(f"{q}.msgs"), self.key(f"{dq_name(q)}.msgs")]
            keys.append(self.key(xq_name(q)))
        if not keys:
            return []
        rows = self._stats(keys=keys)
        now = _now_ms()
        out = []
        for q, (ready, pending, delayed, dead, head) in zip(self.queues, rows, strict=True):
            age: float = 0.0
            if head:
                try:
                    message = Message.decode(head)
                    since = max(
                        message.message_timestamp,
                        int(message.options.get("requeue_timestamp") or 0),
                    )
                    age = max(0.0, (now - since) / 1000)
                except (DecodeError, TypeError, ValueError):
                    age = 0.0
            out.append(
                QueueStats(
                    queue=q,
                    ready=int(ready),
                    delayed=int(delayed),
                    in_progress=max(0, int(pending) - int(ready)),
                    dead=int(dead),
                    oldest_age_seconds=age,
                )
            )
        return out

    def dead(self, queue: str, *, limit: int = 50, cursor: str | None = None) -> DeadPage:
        zkey = self.key(xq_name(self.check(queue)))
        rows: list[tuple[bytes, float]] = []
        if not cursor:
            rows = self.client.zrange(zkey, 0, limit, withscores=True)
        else:
            # Redis orders equal scores by member bytes, so (score, id) is the list order.
            after_score, after_id = self.cursors.decode(f"dead:{queue}", cursor, 2)
            after = (after_score, after_id.encode())
            offset = 0
            while len(rows) <= limit:
                batch = self.client.zrangebyscore(
                    zkey, after_score, "+inf", start=offset, num=limit + 1, withscores=True
                )
                if not batch:
                    break
                offset += len(batch)
                rows += [(m, s) for m, s in batch if (s, m) > after]
            rows = rows[: limit + 1]
        more = len(rows) > limit
        rows = rows[:limit]
        hkey = self.key(f"{xq_name(queue)}.msgs")
        bodies = self.client.hmget(hkey, [m for m, _ in rows]) if rows else []
        items = []
        for (member, score), body in zip(rows, bodies, strict=True):
            if body is None:
                continue
            try:
                items.append(_dead_message(queue, member.decode(), score, body))
            except DecodeError:
                continue
        position = [rows[-1][1], rows[-1][0].decode()] if more else None
        next_cursor = self.cursors.encode(f"dead:{queue}", position) if position else None
        return DeadPage(items=items, next_cursor=next_cursor)

    def retry(self, queue: str, ids: list[str] | None = None) -> RetryResult:
        self.check(queue)
        zkey = self.key(xq_name(queue))
        hkey = self.key(f"{xq_name(queue)}.msgs")
        retried = 0
        not_found: list[str] = []
        if ids is not None:
            batches: Iterator[list[bytes]] = iter([[i.encode() for i in dict.fromkeys(ids)]])
        else:
            batches = self._all_dead(zkey)
        for batch in batches:
            bodies = self.client.hmget(hkey, batch) if batch else []
            for rid, body in zip(batch, bodies, strict=True):
                data = b""
                if body is not None:
                    copy = replay_copy(Message.decode(body), queue, str(uuid.uuid4()))
                    data = copy.encode()
                    new_id = copy.options["redis_message_id"]
                else:
                    new_id = ""
                done = self._retry(
                    keys=[zkey, hkey, self.key(queue), self.key(f"{queue}.msgs")],
                    args=[rid, new_id, data],
                )
                if done:
                    retried += 1
                elif ids is not None:
                    not_found.append(rid.decode())
        return RetryResult(retried=retried, not_found=not_found)

    def _all_dead(self, zkey: str) -> Iterator[list[bytes]]:
        # Only what was dead when the replay started: a replayed message that fails again at
        # once must not be picked up a second time by the same run.
        until = _now_ms()
        seen: set[bytes] = set()
        while True:
            batch = [
                m
                for m in self.client.zrangebyscore(zkey, "-inf", until, start=0, num=500)
                if m not in seen
            ]
            if not batch:
                return
            seen.update(batch)
            yield batch

    def purge(self, queue: str) -> int:
        zkey = self.key(xq_name(self.check(queue)))
        pipe = self.client.pipeline(transaction=True)
        pipe.zcard(zkey)
        pipe.delete(zkey, self.key(f"{xq_name(queue)}.msgs"))
        count, _ = pipe.execute()
        return int(count)


# -- RabbitMQ ----------------------------------------------------------------------------------


class RabbitmqQueueInspector(QueueInspector):
    """Counts from passive queue declarations; dead letters by fetching them.

    RabbitMQ reports ready messages only: messages a worker holds (running, prefetched, or
    delayed and waiting in its memory) are not counted, and there is no latency. Each call opens
    its own short connection (pika connections are not thread-safe).
    """

    kind = "rabbitmq"

    def __init__(
        self,
        parameters: pika.ConnectionParameters,
        queues: Iterable[str],
        cursors: CursorCodec,
        notes: redis.Redis | None = None,
        prefix: str = "",
    ):
        super().__init__(queues, cursors)
        self.parameters = parameters
        # Why each message died lives in Redis (see DeadLetterNotes), keyed by message id.
        self.notes: Any = notes
        self.prefix = prefix

    def _notes(self, message_ids: list[str]) -> list[dict[str, Any] | None]:
        if self.notes is None or not message_ids:
            return [None] * len(message_ids)
        try:
            raw = self.notes.mget([note_key(self.prefix, i) for i in message_ids])
        except redis.RedisError:
            return [None] * len(message_ids)
        return [json.loads(r) if r else None for r in raw]

    @contextmanager
    def _channel(self) -> Iterator[Any]:
        connection = pika.BlockingConnection(self.parameters)
        try:
            yield connection.channel()
        finally:
            if connection.is_open:
                connection.close()

    def _count(self, connection_channel: Any, name: str) -> tuple[Any, int]:
        try:
            frame = connection_channel.queue_declare(queue=name, passive=True)
            return connection_channel, int(frame.method.message_count)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 404:
                raise
            # A queue no worker declared yet holds nothing; the broker closed the channel.
            return connection_channel.connection.channel(), 0

    def stats(self) -> list[QueueStats]:
        out = []
        with self._channel() as ch:
            for q in self.queues:
                ch, ready = self._count(ch, q)
                ch, delayed = self._count(ch, dq_name(q))
                ch, dead = self._count(ch, xq_name(q))
                out.append(QueueStats(q, ready, delayed, None, dead, None))
        return out

    def _fetch(self, ch: Any, queue: str, limit: int) -> Iterator[tuple[int, Any, bytes]]:
        for _ in range(limit):
            method, properties, body = ch.basic_get(queue=queue, auto_ack=False)
            if method is None:
                return
            yield method.delivery_tag, properties, body

    def dead(self, queue: str, *, limit: int = 50, cursor: str | None = None) -> DeadPage:
        name = xq_name(self.check(queue))
        offset = self.cursors.decode(f"dead:{queue}", cursor, 1)[0] if cursor else 0
        rows: list[tuple[str, float | None, bytes]] = []
        fetched = 0
        with self._channel() as ch:
            # Nothing is acked: closing the channel returns every fetched message, in order.
            for _, properties, body in self._fetch(ch, name, offset + limit + 1):
                fetched += 1
                if offset < fetched <= offset + limit:
                    message = Message.decode(body)
                    rows.append((message.message_id, _death_ms(properties), body))
        notes = self._notes([mid for mid, _, _ in rows])
        items = [
            _dead_message(queue, mid, when, body, note)
            for (mid, when, body), note in zip(rows, notes, strict=True)
        ]
        more = fetched > offset + limit
        next_cursor = self.cursors.encode(f"dead:{queue}", [offset + limit]) if more else None
        return DeadPage(items=items, next_cursor=next_cursor)

    def retry(self, queue: str, ids: list[str] | None = None) -> RetryResult:
        name = xq_name(self.check(queue))
        wanted = set(ids) if ids is not None else None
        retried = 0
        with self._channel() as ch:
            ch, total = self._count(ch, name)
            ch.confirm_delivery()
            for tag, _properties, body in self._fetch(ch, name, total):
                message = Message.decode(body)
                if wanted is not None and message.message_id not in wanted:
                    continue
                copy = replay_copy(message, queue)
                # Published (and confirmed) before the dead letter is acked: a crash in
                # between replays it twice rather than losing it; actors are idempotent.
                ch.basic_publish(
                    exchange="",
                    routing_key=queue,
                    body=copy.encode(),
                    properties=pika.BasicProperties(
                        delivery_mode=2, priority=copy.options.get("broker_priority")
                    ),
                )
                ch.basic_ack(tag)
                retried += 1
                if wanted is not None:
                    wanted.discard(message.message_id)
        return RetryResult(retried=retried, not_found=sorted(wanted or ()))

    def purge(self, queue: str) -> int:
        with self._channel() as ch:
            ch, count = self._count(ch, xq_name(self.check(queue)))
            if count:
                frame = ch.queue_purge(queue=xq_name(queue))
                count = int(frame.method.message_count)
        return count


def _death_ms(properties: Any) -> float | None:
    deaths = (getattr(properties, "headers", None) or {}).get("x-death") or []
    when = deaths[0].get("time") if deaths else None
    return when.timestamp() * 1000 if isinstance(when, datetime) else None


def build_inspector(broker: dramatiq.Broker, connections: Connections) -> QueueInspector:
    """The inspector for ``broker``, with a Redis client of its own."""
    queues = broker.get_declared_queues()
    cursors = CursorCodec.of(connections.settings)
    if isinstance(broker, RabbitmqBroker):
        prefix = connections.settings.redis_prefix
        notes = connections.redis_sync()
        return RabbitmqQueueInspector(broker.parameters, queues, cursors, notes, prefix)
    if isinstance(broker, RedisBroker):
        return RedisQueueInspector(connections.broker_redis(), broker.namespace, queues, cursors)
    return QueueInspector(queues, cursors)
