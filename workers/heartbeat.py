"""Worker liveness: a registration per worker process, and deterministic crash recovery.

Dramatiq's Redis broker records a heartbeat per broker (``ns:__heartbeats__``) only when a
consumer talks to Redis, and moves the unacked messages of a broker whose heartbeat is older
than ``heartbeat_timeout`` back to their queue only during "maintenance", which runs on a random
0.1 % of broker commands. A killed worker's messages therefore come back after a minute at the
earliest, and when is a matter of luck. This middleware makes it deterministic: a thread in
every worker process, every second,

1. refreshes this broker's Dramatiq heartbeat (its consumers refresh it on every fetch; this
   makes it independent of how they poll) and this process's registration
   (``{prefix}workers:<id>``: host, pid, queues, in-flight, processed and failed counts; read
   by ``/admin/workers``, ``taskmanager workers|stats`` and ``taskmanager healthcheck worker``);
2. runs Dramatiq's maintenance on every queue and delay queue, which requeues the messages of
   brokers that stopped beating ``heartbeat_timeout`` ago.

A worker killed with SIGKILL thus has its messages back on the queue within
``heartbeat_timeout`` + about 2 s, taken by any other live worker (or the next one to start).
With RabbitMQ, unacked messages return as soon as the connection drops: only the registration
is kept.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

import dramatiq
import redis
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import RedisBroker

from config.connections import Connections
from config.logging import get_logger
from workers.hooks import OutcomeMiddleware
from workers.registry import WORKER_TTL_SECONDS, registry_index, registry_key

log = get_logger(__name__)

#: Seconds between beats (and sweeps).
BEAT_INTERVAL = 1.0


def sweep(broker: RedisBroker, queues: set[str] | None = None) -> None:
    """Run Dramatiq's maintenance now on ``queues`` (default: every queue and delay queue).

    Calls the broker's own dispatch script with ``do_maintenance`` forced on and a command it
    does not know (so nothing else happens); argument order as documented at the top of
    ``dramatiq/brokers/redis/dispatch.lua``. Maintenance is per queue, so each one is swept.
    """
    names = queues if queues is not None else broker.get_declared_queues() | broker.delay_queues
    dispatch = broker.scripts["dispatch"]
    for queue in sorted(names):
        dispatch(
            keys=[broker.namespace],
            args=[
                "maintenance",
                int(time.time() * 1000),
                queue,
                broker.broker_id,
                broker.heartbeat_timeout,
                broker.dead_message_ttl,
                1,
                broker._max_unpack_size(),  # type: ignore[no-untyped-call]
            ],
        )


class WorkerHeartbeat(OutcomeMiddleware):
    """Registers the worker, keeps its heartbeat fresh and sweeps dead workers' messages."""

    def __init__(self, connections: Connections, *, interval: float = BEAT_INTERVAL):
        self.connections = connections
        self.prefix = connections.settings.redis_prefix
        self.interval = interval
        self.worker_id = uuid.uuid4().hex
        self.state = "starting"
        self.started_at = 0
        self.queues: list[str] = []
        self.threads = 0
        self._in_flight: set[str] = set()
        #: Messages this process ran since it started: succeeded, and failed attempts (a
        #: retried message counts once per failure). Shown by ``taskmanager workers|stats``.
        self.processed = 0
        self.failed = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: redis.Redis | None = None
        self._broker: dramatiq.Broker | None = None
        # Sweeping is held back until beats have succeeded for a while: after a Redis outage
        # every worker's heartbeat looks stale, and sweeping at once would redeliver the
        # messages live workers are still running.
        self._healthy_since: float | None = None
        self._hold_back = 0.0

    @property
    def in_flight(self) -> int:
        """Messages this process is running now."""
        with self._lock:
            return len(self._in_flight)

    # -- hooks --------------------------------------------------------------------------------

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """Register and start beating."""
        self._broker = broker
        # Dramatiq's broker id names this process's heartbeat and ack sets: use the same.
        self.worker_id = str(getattr(broker, "broker_id", self.worker_id))
        self.started_at = int(time.time() * 1000)
        self.queues = sorted(worker.consumer_whitelist or broker.get_declared_queues())
        self.threads = worker.worker_threads
        self.state = "running"
        self._client = self.connections.redis_sync()
        self._stop.clear()
        try:
            self.beat()
        except redis.RedisError as exc:
            log.warning("worker.heartbeat_failed", error=str(exc))
        self._thread = threading.Thread(target=self._run, name="worker-heartbeat", daemon=True)
        self._thread.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """Show the draining state; beats go on while in-flight messages finish."""
        self.state = "stopping"
        try:
            self.beat()
        except redis.RedisError as exc:
            log.warning("worker.heartbeat_failed", error=str(exc))

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """Stop beating and deregister."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval + 6)
            self._thread = None
        if self._client is not None:
            try:
                pipe = self._client.pipeline(transaction=True)
                pipe.zrem(registry_index(self.prefix), self.worker_id)
                pipe.delete(registry_key(self.prefix, self.worker_id))
                pipe.execute()
            except redis.RedisError:
                pass  # the registration expires by itself
            self._client.close()
            self._client = None

    def before_process_message(
        self, broker: dramatiq.Broker, message: dramatiq.broker.MessageProxy
    ) -> None:
        """Count the message in."""
        with self._lock:
            self._in_flight.add(self._message_key(message))

    def message_ended(
        self, broker: dramatiq.Broker, message: MessageProxy, exception: BaseException | None
    ) -> None:
        """Count the message out, as processed or failed."""
        with self._lock:
            self._in_flight.discard(self._message_key(message))
            if exception is None:
                self.processed += 1
            else:
                self.failed += 1

    def after_skip_message(
        self, broker: dramatiq.Broker, message: dramatiq.broker.MessageProxy
    ) -> None:
        """A skipped message is out too (neither processed nor failed)."""
        with self._lock:
            self._in_flight.discard(self._message_key(message))

    @staticmethod
    def _message_key(message: dramatiq.broker.MessageProxy) -> str:
        return str(message.options.get("redis_message_id") or message.message_id)

    # -- the beat -----------------------------------------------------------------------------

    def beat(self) -> None:
        """Write the registration and Dramatiq's heartbeat once."""
        client = self._client
        if client is None:
            return
        now = int(time.time() * 1000)
        key = registry_key(self.prefix, self.worker_id)
        pipe = client.pipeline(transaction=True)
        pipe.hset(
            key,
            mapping={
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "queues": json.dumps(self.queues),
                "threads": self.threads,
                "state": self.state,
                "started_at": self.started_at,
                "last_beat": now,
                "in_flight": self.in_flight,
                "processed": self.processed,
                "failed": self.failed,
            },
        )
        pipe.expire(key, WORKER_TTL_SECONDS)
        pipe.zadd(registry_index(self.prefix), {self.worker_id: now})
        pipe.execute()
        broker = self._broker
        if isinstance(broker, RedisBroker):
            broker.client.zadd(f"{broker.namespace}:__heartbeats__", {broker.broker_id: now})

    def _run(self) -> None:
        while True:
            self._tick()
            if self._stop.wait(self.interval):
                return

    def _tick(self) -> None:
        try:
            self.beat()
            now = time.monotonic()
            if self._healthy_since is None:
                self._healthy_since = now
            broker = self._broker
            if isinstance(broker, RedisBroker) and now - self._healthy_since >= self._hold_back:
                sweep(broker)
        except redis.RedisError as exc:
            if self._healthy_since is not None:
                log.warning("worker.heartbeat_failed", error=str(exc))
            self._healthy_since = None
            self._hold_back = 3 * self.interval
        except Exception:
            log.exception("worker.heartbeat_error")
