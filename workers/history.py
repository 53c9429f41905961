"""The write side of the message history (layout, definitions and memory bound: core/history.py).

Every worker process counts its messages in memory as they end (a dictionary update under a
lock: no Redis round trip per message) and a thread of its own adds the counts to Redis about
once a second, with one pipeline: HINCRBY per (minute, field) on the minute's and the
10 minutes' hashes, and EXPIREAT per hash touched (:func:`core.history.add_counts`).
Counts are batched per minute of the attempt's end, so a late flush still lands in the right
minute.

Failure handling: message processing never waits on Redis and never sees its errors. When a
flush fails (Redis down or too slow: the synchronous client's timeouts apply) that batch is
dropped and logged once per outage, so an outage loses at most the counts not yet flushed
(those of the seconds Redis was away), never more, and the in-memory counts stay bounded.
On shutdown the counts left are flushed once more.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import dramatiq
import redis
from dramatiq.broker import MessageProxy
from dramatiq.common import q_name

from config.connections import Connections
from config.logging import get_logger
from core.history import (
    ACTOR_FAILED,
    ACTOR_PROCESSED,
    OTHER,
    QUEUE_FAILED,
    QUEUE_PROCESSED,
    add_counts,
    field,
)
from workers.hooks import OutcomeMiddleware

log = get_logger(__name__)

#: Seconds between flushes.
FLUSH_INTERVAL = 1.0


class HistoryRecorder(OutcomeMiddleware):
    """Counts processed and failed messages per minute, queue and actor, and adds them to
    Redis from a background thread about once a second."""

    def __init__(self, connections: Connections, *, interval: float = FLUSH_INTERVAL):
        self.connections = connections
        self.prefix = connections.settings.redis_prefix
        self.interval = interval
        #: (minute, field) -> count not yet flushed.
        self._counts: Counter[tuple[int, str]] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: redis.Redis | None = None
        self._failing = False
        #: Attempts whose counts were added to Redis, and attempts whose counts were dropped by
        #: failed flushes, since start.
        self.flushed = 0
        self.dropped = 0

    # -- counting (worker threads) ------------------------------------------------------------

    def message_ended(
        self, broker: dramatiq.Broker, message: MessageProxy, exception: BaseException | None
    ) -> None:
        """Count one attempt that ran to the end (and failed, when ``exception``)."""
        queue = q_name(message.queue_name)
        if queue not in broker.get_declared_queues():
            queue = OTHER
        actor = message.actor_name if message.actor_name in broker.actors else OTHER
        minute = int(time.time()) // 60
        with self._lock:
            counts = self._counts
            counts[(minute, field(QUEUE_PROCESSED, queue))] += 1
            counts[(minute, field(ACTOR_PROCESSED, actor))] += 1
            if exception is not None:
                counts[(minute, field(QUEUE_FAILED, queue))] += 1
                counts[(minute, field(ACTOR_FAILED, actor))] += 1

    @property
    def pending(self) -> int:
        """Attempts waiting for the next flush."""
        with self._lock:
            return sum(
                n for (_, name), n in self._counts.items() if name.startswith(QUEUE_PROCESSED)
            )

    # -- process ------------------------------------------------------------------------------

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """Start flushing (once per process)."""
        if self._thread is not None:
            return
        self._client = self.connections.redis_sync()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="worker-history", daemon=True)
        self._thread.start()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """Stop the thread and flush what is left."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval + 12)
            self._thread = None
        self.flush()
        if self._client is not None:
            self._client.close()
            self._client = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()

    # -- flushing (the thread) ----------------------------------------------------------------

    def flush(self) -> int:
        """Add the counts so far to Redis in one pipeline; returns how many were added (0 when
        there were none, or when Redis failed and they were dropped)."""
        with self._lock:
            batch, self._counts = self._counts, Counter()
        client = self._client
        if not batch or client is None:
            return 0
        # Attempts (each has one queue-processed count), for the log and the tallies.
        total = sum(n for (_, name), n in batch.items() if name.startswith(QUEUE_PROCESSED))
        try:
            pipe = client.pipeline(transaction=False)
            add_counts(pipe, self.prefix, batch)
            pipe.execute()
        except redis.RedisError as exc:
            self.dropped += total
            if not self._failing:
                log.warning("worker.history_flush_failed", error=str(exc), dropped=total)
            self._failing = True
            return 0
        except Exception:
            self.dropped += total
            log.exception("worker.history_flush_error")
            return 0
        if self._failing:
            log.info("worker.history_flush_resumed")
        self._failing = False
        self.flushed += total
        return total
