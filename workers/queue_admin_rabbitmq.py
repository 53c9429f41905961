"""The RabbitMQ queue inspector: counts from passive queue declarations, dead letters by
fetching them (and returning the rest). Ready and delayed messages cannot be read without
taking them from the workers: those operations answer 501 (:class:`Unsupported`)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import pika  # type: ignore[import-untyped]
import pika.exceptions  # type: ignore[import-untyped]
import redis
from dramatiq.common import dq_name, xq_name
from dramatiq.message import Message

from core.errors import NotFound
from core.pagination import CursorCodec
from workers.dead_letter_notes import note_key
from workers.pause import PauseStore
from workers.queue_inspector import (
    DeadMessage,
    DeadPage,
    QueueInspector,
    QueueStats,
    RetryResult,
    Unsupported,
    dead_detail,
    matches,
    replay_copy,
)
from workers.queue_inspector import dead_message as _dead_message
from workers.queue_messages import MessageDetail


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
        pauses: PauseStore | None = None,
    ):
        super().__init__(queues, cursors, pauses)
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
        paused = self.paused_for_stats()
        with self._channel() as ch:
            for q in self.queues:
                ch, ready = self._count(ch, q)
                ch, delayed = self._count(ch, dq_name(q))
                ch, dead = self._count(ch, xq_name(q))
                out.append(QueueStats(q, ready, delayed, None, dead, None, paused(q)))
        return out

    def _fetch(self, ch: Any, queue: str, limit: int) -> Iterator[tuple[int, Any, bytes]]:
        for _ in range(limit):
            method, properties, body = ch.basic_get(queue=queue, auto_ack=False)
            if method is None:
                return
            yield method.delivery_tag, properties, body

    def dead(
        self,
        queue: str,
        *,
        limit: int = 50,
        cursor: str | None = None,
        actor: str | None = None,
        error: str | None = None,
    ) -> DeadPage:
        name = xq_name(self.check(queue))
        offset = self.cursors.decode(f"dead:{queue}", cursor, 1)[0] if cursor else 0
        if actor is not None or error:
            # Filtered: every letter is read (and returned), the page counts matches only.
            found = [m for m, _ in self._every_dead(queue) if matches(m, actor, error)]
            more = len(found) > offset + limit
            position = [offset + limit] if more else None
            return DeadPage(
                items=found[offset : offset + limit],
                next_cursor=self.cursors.encode(f"dead:{queue}", position) if position else None,
            )
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

    def _every_dead(self, queue: str) -> list[tuple[DeadMessage, dict[str, Any]]]:
        """Every dead letter of ``queue`` (fetched, none acked: all go back), with options."""
        name = xq_name(self.check(queue))
        rows: list[tuple[Message[Any], float | None, bytes]] = []
        with self._channel() as ch:
            ch, total = self._count(ch, name)
            for _, properties, body in self._fetch(ch, name, total):
                rows.append((Message.decode(body), _death_ms(properties), body))
        notes = self._notes([m.message_id for m, _, _ in rows])
        return [
            (_dead_message(queue, m.message_id, when, body, note), {**m.options, **(note or {})})
            for (m, when, body), note in zip(rows, notes, strict=True)
        ]

    def dead_detail(self, queue: str, rid: str) -> MessageDetail:
        for item, options in self._every_dead(queue):
            if item.id == rid:
                return dead_detail(item, options)
        raise NotFound(f"No dead letter {rid!r} in {queue!r}")

    def delete_dead(self, queue: str, rid: str) -> None:
        name = xq_name(self.check(queue))
        with self._channel() as ch:
            ch, total = self._count(ch, name)
            for tag, _properties, body in self._fetch(ch, name, total):
                if Message.decode(body).message_id == rid:
                    ch.basic_ack(tag)  # the others go back when the channel closes
                    return
        raise NotFound(f"No dead letter {rid!r} in {queue!r}")

    def find(self, wanted: str) -> MessageDetail:
        for queue in self.queues:
            for item, options in self._every_dead(queue):
                if item.id == wanted:
                    return dead_detail(item, options)
        raise NotFound(
            f"No dead letter with id {wanted!r} (on RabbitMQ only dead letters can be looked up)"
        )

    def retry_message(self, queue: str, rid: str) -> str:
        if self.retry(queue, [rid]).retried:
            return rid
        raise Unsupported(
            f"{rid!r} is not a dead letter of {queue!r}; on RabbitMQ only dead letters can be "
            "retried one by one"
        )

    def delete_message(self, queue: str, rid: str) -> None:
        try:
            self.delete_dead(queue, rid)
        except NotFound as exc:
            raise Unsupported(
                f"{rid!r} is not a dead letter of {queue!r}; on RabbitMQ only dead letters can "
                "be deleted one by one"
            ) from exc

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
