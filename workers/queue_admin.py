"""Queue operations: per-queue counts and latency, the dead-letter queue (list with filters,
replay, purge, one letter shown or deleted), one message at a time (browse, find, retry now,
delete) and the paused flag. This module is the Redis inspector and :func:`build_inspector`;
the interface and the shared types are :mod:`workers.queue_inspector` (re-exported here), the
RabbitMQ inspector :mod:`workers.queue_admin_rabbitmq`. Why a message died is recorded by
:mod:`workers.dead_letter_notes`; the registry of live workers is :mod:`workers.registry`.

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
listing, showing, replaying and deleting dead letters works by fetching them and returning the
rest. Ready and delayed messages cannot be read without taking them from the workers, so
browsing them, moving one ("retry now") and deleting one answer 501 (:class:`Unsupported`) on
RabbitMQ; finding a message by id searches the dead letters only.

Message-level operations on Redis (browse, find, retry now, delete one, tracebacks with our
frames first) are :mod:`workers.queue_messages`; pausing a queue is :mod:`workers.pause`.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import dq_name, xq_name
from dramatiq.errors import DecodeError
from dramatiq.message import Message

from config.connections import Connections
from core.errors import NotFound
from core.pagination import CursorCodec
from workers.pause import PauseStore
from workers.queue_inspector import (
    ATTEMPT_OPTIONS,
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
from workers.queue_messages import MessageDetail, MessagePage, RedisMessages
from workers.registry import _now_ms

__all__ = [
    "ATTEMPT_OPTIONS",
    "DeadMessage",
    "DeadPage",
    "QueueInspector",
    "QueueStats",
    "RedisQueueInspector",
    "RetryResult",
    "Unsupported",
    "build_inspector",
]

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
        self,
        client: redis.Redis,
        namespace: str,
        queues: Iterable[str],
        cursors: CursorCodec,
        pauses: PauseStore | None = None,
    ):
        super().__init__(queues, cursors, pauses)
        # Typed loosely: redis-py's reply types are unions over every response decoding.
        self.client: Any = client
        self.namespace = namespace
        self._stats = client.register_script(_STATS_LUA)
        self._retry = client.register_script(_RETRY_LUA)
        self.ops = RedisMessages(client, namespace)

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
        paused = self.paused_for_stats()
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
                    paused=paused(q),
                )
            )
        return out

    def dead(
        self,
        queue: str,
        *,
        limit: int = 50,
        cursor: str | None = None,
        actor: str | None = None,
        error: str | None = None,
    ) -> DeadPage:
        zkey = self.key(xq_name(self.check(queue)))
        after: tuple[float, bytes] | None = None
        if cursor:
            after_score, after_id = self.cursors.decode(f"dead:{queue}", cursor, 2)
            after = (float(after_score), str(after_id).encode())
        items: list[DeadMessage] = []
        more = False
        for member, score, item in self._dead_rows(queue, zkey, after, limit):
            if not matches(item, actor, error):
                continue
            if len(items) == limit:
                more = True
                break
            items.append(item)
            after = (score, member)
        position = [after[0], after[1].decode()] if more and after else None
        next_cursor = self.cursors.encode(f"dead:{queue}", position) if position else None
        return DeadPage(items=items, next_cursor=next_cursor)

    def _dead_rows(
        self, queue: str, zkey: str, after: tuple[float, bytes] | None, limit: int
    ) -> Iterator[tuple[bytes, float, DeadMessage]]:
        """Dead letters after ``after`` in list order (score, then id: how Redis orders equal
        scores), in batches."""
        hkey = self.key(f"{xq_name(queue)}.msgs")
        batch_size = max(limit + 1, 200)
        offset = 0
        low = after[0] if after else "-inf"
        while True:
            rows = self.client.zrangebyscore(
                zkey, low, "+inf", start=offset, num=batch_size, withscores=True
            )
            if not rows:
                return
            offset += len(rows)
            rows = [(m, s) for m, s in rows if after is None or (s, m) > after]
            bodies = self.client.hmget(hkey, [m for m, _ in rows]) if rows else []
            for (member, score), body in zip(rows, bodies, strict=True):
                if body is None:
                    continue
                try:
                    yield member, score, _dead_message(queue, member.decode(), score, body)
                except DecodeError:
                    continue

    def retry(self, queue: str, ids: list[str] | None = None) -> RetryResult:
        self.check(queue)
        zkey = self.key(xq_name(queue))
        hkey = self.key(f"{xq_name(queue)}.msgs")
        retried = 0
        not_found: list[str] = []
        new_ids: list[str] = []
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
                    new_ids.append(new_id)
                elif ids is not None:
                    not_found.append(rid.decode())
        return RetryResult(retried=retried, not_found=not_found, new_ids=new_ids)

    def dead_detail(self, queue: str, rid: str) -> MessageDetail:
        xq = xq_name(self.check(queue))
        body = self.client.hget(self.key(f"{xq}.msgs"), rid)
        score = self.client.zscore(self.key(xq), rid)
        if body is None or score is None:
            raise NotFound(f"No dead letter {rid!r} in {queue!r}")
        return dead_detail(_dead_message(queue, rid, score, body), Message.decode(body).options)

    def delete_dead(self, queue: str, rid: str) -> None:
        if not self.ops.delete_dead(self.check(queue), rid):
            raise NotFound(f"No dead letter {rid!r} in {queue!r}")

    def messages(
        self, queue: str, state: str = "ready", *, limit: int = 50, cursor: str | None = None
    ) -> MessagePage:
        self.check(queue)
        scope = f"messages:{queue}:{state}"
        if state == "ready":
            start = 0
            if cursor:
                # The list moves as workers take from its head: continue after the last item
                # shown if it is still there, else from the same index.
                last_id, index = self.cursors.decode(scope, cursor, 2)
                now_at = self.ops.index_of(queue, str(last_id))
                start = now_at + 1 if now_at is not None else int(index)
            items = self.ops.ready(queue, start, limit + 1)
            more = len(items) > limit
            items = items[:limit]
            position = [items[-1].id, start + len(items)] if more and items else None
        elif state == "delayed":
            everything = self.ops.delayed(queue)
            if cursor:
                (last_id,) = self.cursors.decode(scope, cursor, 1)
                ids = [m.id for m in everything]
                everything = everything[ids.index(last_id) + 1 :] if last_id in ids else everything
            items, more = everything[:limit], len(everything) > limit
            position = [items[-1].id] if more and items else None
        else:
            raise NotFound(f"No message state {state!r} (ready or delayed)")
        next_cursor = self.cursors.encode(scope, position) if position else None
        return MessagePage(items=items, next_cursor=next_cursor)

    def find(self, wanted: str) -> MessageDetail:
        return self.ops.find(self.queues, wanted)

    def _in_queue(self, queue: str, rid: str) -> MessageDetail:
        detail = self.ops.find([self.check(queue)], rid)
        if detail.queue != queue:
            raise NotFound(f"No message {rid!r} in {queue!r}")
        return detail

    def retry_message(self, queue: str, rid: str) -> str:
        detail = self._in_queue(queue, rid)
        if detail.state == "dead":
            result = self.retry(queue, [detail.id])
            if not result.retried:
                raise NotFound(f"No dead letter {detail.id!r} in {queue!r}")
            return result.new_ids[0]
        return self.ops.retry_now(queue, detail)

    def delete_message(self, queue: str, rid: str) -> None:
        self.ops.delete(queue, self._in_queue(queue, rid))

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


def build_inspector(broker: dramatiq.Broker, connections: Connections) -> QueueInspector:
    """The inspector for ``broker``, with a Redis client of its own."""
    queues = broker.get_declared_queues()
    cursors = CursorCodec.of(connections.settings)
    prefix = connections.settings.redis_prefix
    pauses = PauseStore(connections.redis_sync(), prefix)
    if isinstance(broker, RedisBroker):
        client = connections.broker_redis()
        return RedisQueueInspector(client, broker.namespace, queues, cursors, pauses)
    # A RabbitMQ broker's module is loaded already (workers/broker.py imports it for one);
    # where it is not, no broker can be one, and pika stays unloaded.
    rabbitmq = sys.modules.get("dramatiq.brokers.rabbitmq")
    if rabbitmq is not None and isinstance(broker, rabbitmq.RabbitmqBroker):
        from workers.queue_admin_rabbitmq import RabbitmqQueueInspector

        notes = connections.redis_sync()
        return RabbitmqQueueInspector(broker.parameters, queues, cursors, notes, prefix, pauses)
    return QueueInspector(queues, cursors, pauses)
