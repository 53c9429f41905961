"""Worker liveness: a registration per worker process, and deterministic crash recovery.

Dramatiq's Redis broker records a heartbeat per broker (``ns:__heartbeats__``) only when a
consumer talks to Redis, and moves the unacked messages of a broker whose heartbeat is older
than ``heartbeat_timeout`` back to their queue only during "maintenance", which runs on a random
0.1 % of broker commands. A killed worker's messages therefore come back after a minute at the
earliest, and when is a matter of luck. This middleware makes it deterministic: a thread in
every worker process, every second,

1. refreshes this broker's Dramatiq heartbeat (its consumers refresh it on every fetch; this
   makes it independent of how they poll) and this process's registration
   (``{prefix}workers:<id>``: host, pid, queues, in-flight, processed and failed counts, RSS,
   and the busy view: per running message its thread, actor, message id, queue, a short
   summary of its arguments (:func:`args_summary`) and when it started; read by
   ``/admin/workers``, ``taskmanager workers|stats`` and ``taskmanager healthcheck worker``);
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
import re
import resource
import socket
import sys
import threading
import time
import uuid

import dramatiq
import redis
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import q_name

from config.connections import Connections
from config.logging import get_logger
from workers.hooks import OutcomeMiddleware
from workers.registry import WORKER_TTL_SECONDS, registry_index, registry_key

log = get_logger(__name__)

#: Seconds between beats (and sweeps).
BEAT_INTERVAL = 1.0
#: Longest arguments summary in the busy view (characters), and longest value in it.
ARGS_SUMMARY_MAX = 160
_VALUE_MAX = 40
#: Keys whose values the summary never shows.
_SECRET_KEY = re.compile(r"secret|token|passw|authoriz|signature|api.?key|cookie|credential", re.I)


def args_summary(args: tuple[object, ...] | list[object], kwargs: dict[str, object]) -> str:
    """A short, safe summary of a message's arguments for the busy view: scalars (ids, types)
    as JSON cut at 40 characters, the top level of an object with its nested objects and lists
    elided (a task event shows its ids and type, not the task's text), values under
    secret-looking keys masked; the whole cut at :data:`ARGS_SUMMARY_MAX` characters."""
    parts = [_summary(a) for a in args]
    parts += [
        f"{k}=***" if _SECRET_KEY.search(k) else f"{k}={_summary(v)}" for k, v in kwargs.items()
    ]
    text = ", ".join(parts)
    return text if len(text) <= ARGS_SUMMARY_MAX else text[: ARGS_SUMMARY_MAX - 1] + "\u2026"


def _summary(value: object, nested: bool = False) -> str:
    if isinstance(value, dict):
        if nested:
            return "{\u2026}"
        items = (
            f"{k}: ***" if _SECRET_KEY.search(str(k)) else f"{k}: {_summary(v, True)}"
            for k, v in value.items()
        )
        return "{" + ", ".join(items) + "}"
    if isinstance(value, list | tuple):
        return f"[{len(value)} items]"
    text = json.dumps(value, default=str)
    return text if len(text) <= _VALUE_MAX else text[: _VALUE_MAX - 1] + "\u2026"


def rss_bytes() -> int | None:
    """This process's resident memory: ``/proc/self/statm`` (Linux), else the peak RSS that
    ``getrusage`` reports; ``None`` when neither answers."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (OSError, ValueError):
        return None
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS: bytes; else KiB


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
        #: The messages running now, by broker id: the busy view's entries.
        self._in_flight: dict[str, dict[str, object]] = {}
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
        """Count the message in (on the worker thread that runs it), for the busy view."""
        entry: dict[str, object] = {
            "thread": threading.current_thread().name,
            "actor": message.actor_name,
            "message_id": message.message_id,
            "queue": q_name(message.queue_name),
            "args_summary": args_summary(message.args, message.kwargs),
            "started_at": int(time.time() * 1000),
        }
        with self._lock:
            self._in_flight[self._message_key(message)] = entry

    def message_ended(
        self, broker: dramatiq.Broker, message: MessageProxy, exception: BaseException | None
    ) -> None:
        """Count the message out, as processed or failed."""
        with self._lock:
            self._in_flight.pop(self._message_key(message), None)
            if exception is None:
                self.processed += 1
            else:
                self.failed += 1

    def after_skip_message(
        self, broker: dramatiq.Broker, message: dramatiq.broker.MessageProxy
    ) -> None:
        """A skipped message is out too (neither processed nor failed)."""
        with self._lock:
            self._in_flight.pop(self._message_key(message), None)

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
        with self._lock:
            busy = list(self._in_flight.values())
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
                "in_flight": len(busy),
                "processed": self.processed,
                "failed": self.failed,
                "busy": json.dumps(busy),
                "rss_bytes": rss_bytes() or "",
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
