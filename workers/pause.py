"""Pausing a queue: workers stop taking its messages until it is resumed.

The paused queues are a Redis set, ``{REDIS_PREFIX}queues:paused`` (in ``REDIS_URL``'s Redis,
whichever the broker), written by ``POST /admin/queues/{queue}/pause|resume`` and
``taskmanager queues pause|resume``, and read by every worker at most once a second
(:class:`PausedQueues`).

How a worker honours it (:class:`QueuePause`, a Dramatiq middleware):

1. **No fetching.** Dramatiq's consumer threads take messages through ``broker.consume()``.
   When a consumer thread boots, the middleware gives it a view of the broker whose consumers
   (:class:`PausableConsumer`) answer "nothing yet" without fetching while their queue is
   paused. A paused queue's messages so stay in its ready list, in order, where the operator
   sees them (``ready`` counts them, the list shows them). Delay queues are not paused: a
   delayed message becomes ready at its eta and waits there.
2. **Nothing run.** Messages fetched just before the pause was seen (a consumer prefetches a
   few per thread) are checked as a worker thread takes them: on Redis, one of a paused queue
   goes back to the head of its ready list (same id, one Lua script: out of the worker's acks
   set, onto the list) and is skipped, counted neither as processed, failed nor retried. On
   RabbitMQ those already handed to a worker thread still run (RabbitMQ has no "put back at
   the head"); and since RabbitMQ pushes up to the prefetch count (2 per thread) to each
   consumer, that many per worker wait delivered but unacked (not counted as ready) until the
   resume, run by no one meanwhile.

A pause so takes effect within about a second plus, at most, the message each thread is
running; a resume within a second.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import q_name
from dramatiq.middleware import SkipMessage

from config.connections import Connections
from config.logging import get_logger

log = get_logger(__name__)

#: A worker reads the paused set at most this often (seconds).
REFRESH_SECONDS = 1.0

# KEYS: worker's acks set, ready list, ready hash; ARGV: id. Back at the head, same id.
_PUT_BACK_LUA = """
if redis.call("srem", KEYS[1], ARGV[1]) == 1 then
    if redis.call("hexists", KEYS[3], ARGV[1]) == 1 then
        redis.call("lpush", KEYS[2], ARGV[1])
        return 1
    end
end
return 0
"""


def paused_key(prefix: str) -> str:
    """The Redis set of paused queue names."""
    return f"{prefix}queues:paused"


class PauseStore:
    """Reads and writes the paused set (synchronous: the web runs it on a thread)."""

    def __init__(self, client: Any, prefix: str):
        self.client = client
        self.key = paused_key(prefix)

    def paused(self) -> set[str]:
        """The paused queues."""
        return {
            m.decode() if isinstance(m, bytes) else str(m) for m in self.client.smembers(self.key)
        }

    def set(self, queue: str, paused: bool) -> bool:
        """Pause or resume ``queue``; whether that changed anything."""
        if paused:
            return bool(self.client.sadd(self.key, queue))
        return bool(self.client.srem(self.key, queue))


class PausedQueues:
    """The paused set as a worker sees it: read from Redis at most every
    :data:`REFRESH_SECONDS`, by one thread at a time (the others use the last reading). If
    Redis cannot be read, the last reading stays (a Redis outage neither pauses nor resumes)."""

    def __init__(self, store_factory: Any, refresh: float = REFRESH_SECONDS):
        self._factory = store_factory
        self._store: PauseStore | None = None
        self._refresh = refresh
        self._lock = threading.Lock()
        self._names: frozenset[str] = frozenset()
        self._read_at = float("-inf")

    def names(self) -> frozenset[str]:
        """The paused queues, at most :data:`REFRESH_SECONDS` old. Until the first reading is
        done every thread waits for it: a worker that starts just after a pause never takes a
        paused queue's message because its first look found nothing read yet."""
        if not self._stale():
            return self._names
        first = self._read_at == float("-inf")
        if self._lock.acquire(blocking=first):
            try:
                if self._stale():  # another thread may have read it while this one waited
                    self._read()
            finally:
                self._lock.release()
        return self._names

    def _stale(self) -> bool:
        return time.monotonic() - self._read_at >= self._refresh

    def _read(self) -> None:
        """One reading of the paused set (the lock held); a Redis error keeps the last one."""
        try:
            if self._store is None:
                self._store = self._factory()
            assert self._store is not None
            self._names = frozenset(self._store.paused())
        except redis.RedisError as exc:
            log.warning("queue.pause_state_unreadable", error=type(exc).__name__)
        finally:
            self._read_at = time.monotonic()

    def __contains__(self, queue: object) -> bool:
        return queue in self.names()


class PausableConsumer(dramatiq.Consumer):
    """A consumer that fetches nothing while its queue is paused (it idles ``timeout`` ms per
    call, keeping a RabbitMQ connection's heartbeats going)."""

    def __init__(self, inner: dramatiq.Consumer, queue: str, paused: PausedQueues, timeout: int):
        self.inner = inner
        self.queue = queue
        self.paused = paused
        self.timeout = timeout / 1000

    def __next__(self) -> dramatiq.broker.MessageProxy | None:
        # Messages the inner consumer already fetched are handed on (and put back, see
        # QueuePause.before_process_message), not held while the queue is paused.
        if self.queue in self.paused and not getattr(self.inner, "message_cache", None):
            connection = getattr(self.inner, "connection", None)
            if connection is not None and hasattr(connection, "sleep"):
                connection.sleep(self.timeout)  # pika: sleep while serving the connection
            else:
                time.sleep(self.timeout)
            return None
        return next(self.inner)

    def ack(self, message: dramatiq.broker.MessageProxy) -> None:
        """As the inner consumer."""
        self.inner.ack(message)

    def nack(self, message: dramatiq.broker.MessageProxy) -> None:
        """As the inner consumer."""
        self.inner.nack(message)

    def requeue(self, messages: Iterable[dramatiq.broker.MessageProxy]) -> None:
        """As the inner consumer."""
        self.inner.requeue(messages)

    def close(self) -> None:
        """As the inner consumer."""
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _PausingBroker:
    """The broker as a consumer thread of a main queue sees it: ``consume()`` wraps the
    consumer in a :class:`PausableConsumer`; everything else passes through."""

    def __init__(self, broker: Any, paused: PausedQueues):
        self._broker = broker
        self._paused = paused

    def __getattr__(self, name: str) -> Any:
        return getattr(self._broker, name)

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Any:
        """The broker's consumer, paused with its queue."""
        inner = self._broker.consume(queue_name, prefetch=prefetch, timeout=timeout)
        return PausableConsumer(inner, q_name(queue_name), self._paused, timeout)


class QueuePause(dramatiq.Middleware):
    """Makes a worker honour paused queues (see the module docstring). Registered first in the
    broker's middleware, so a message put back was not started by any other middleware."""

    def __init__(self, connections: Connections):
        self.connections = connections
        self.paused = PausedQueues(
            lambda: PauseStore(connections.redis_sync(), connections.settings.redis_prefix)
        )
        self._scripts: dict[int, Any] = {}

    def after_consumer_thread_boot(self, broker: dramatiq.Broker, thread: Any) -> None:
        """Give a main queue's consumer thread the pausing view of the broker."""
        if thread.queue_name == q_name(thread.queue_name):
            thread.broker = _PausingBroker(thread.broker, self.paused)

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        """A message of a paused queue fetched before the pause was seen: back to the head of
        its ready list, skipped (Redis)."""
        queue = q_name(message.queue_name)
        if queue not in self.paused or not isinstance(broker, RedisBroker):
            return
        rid = message.options.get("redis_message_id")
        if rid is None:
            return
        script = self._scripts.get(id(broker))
        if script is None:
            script = self._scripts[id(broker)] = broker.client.register_script(_PUT_BACK_LUA)
        ns = broker.namespace
        keys = [f"{ns}:__acks__.{broker.broker_id}.{queue}", f"{ns}:{queue}", f"{ns}:{queue}.msgs"]
        try:
            put_back = script(keys=keys, args=[rid])
        except redis.RedisError:
            return  # cannot put it back: run it rather than hold it
        if put_back:
            log.info("queue.paused_message_put_back", queue=queue, message_id=message.message_id)
            raise SkipMessage(f"queue {queue} is paused")
