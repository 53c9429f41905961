"""Prometheus metrics of the web process (process-wide registry, as Prometheus expects).

Also exposed from the same registry: the outbox relay's (``taskmanager_outbox_*``, declared in
``workers/relay.py``, which cannot import ``web``), the cache's (``core/cache.py``), the queue
gauges (``web/handlers/admin.py``, :class:`QueueExporterLease`) and, under ``taskmanager run``
(worker threads in this process), the worker families (``workers/metrics.py``).

Queue gauges and replicas: ``taskmanager_queue_messages`` and
``taskmanager_queue_oldest_age_seconds`` describe the shared broker, not one process. If every
web replica exported them, ``sum`` over replicas would multiply the depth by the replica
count. So exactly one replica exports them: the holder of a lease in Redis
(:class:`QueueExporterLease`, ``<REDIS_PREFIX>metrics:queue-exporter``), taken or renewed when
the replica is scraped and kept :data:`QUEUE_EXPORTER_TTL_MS` after its last scrape (keep
Prometheus's scrape interval below that). The others export ``taskmanager_queue_stats_up 0``
and no queue series, so ``sum`` (and ``max``) over replicas give the true depth and
``sum(taskmanager_queue_stats_up)`` is 1 while the queues are exported. When the holder dies
another replica takes over at the first scrape after the lease runs out (a gap of at most
that long); Redis unreachable means no replica exports them (``up`` 0 everywhere).

Several processes per replica (``taskmanager web --processes N``, ``web/group.py``): a scrape
reaches one child at random, so the children keep their metrics in prometheus_client's
multiprocess files and each child's ``/metrics`` serves the merge (:func:`scrape_registry`):

- counters and histograms (``http_*``, ``ratelimit_*``, ``cache_*``, the outbox's
  ``*_total``): summed over the children, those that exited included (totals of the group);
- the outbox gauges (``taskmanager_outbox_events``,
  ``taskmanager_outbox_oldest_pending_age_seconds``) and ``taskmanager_user_backlog``: every
  child's relay reads the same shared outbox, so the merge takes the most recent value among
  the live children (``livemostrecent``). ``taskmanager_user_backlog`` is only partly right
  there: a user who leaves a queue's top 10 is set to 0 rather than removed (the files keep
  every series a child ever wrote), so in a group its series include zeros of former top
  users until the group restarts (``topk``/``sum`` are unaffected);
- the queue gauges: the lease is held in the group's name (all its children share it), and a
  child exports its own reading, outside the files: whichever child is scraped exports them,
  and one replica's scrape counts them once;
- prometheus_client's process and platform families (``process_*``, ``python_*``) are left
  out: they would describe whichever child answered. Per-process CPU and memory come from
  the container or node exporter.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading

import redis
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, multiprocess
from prometheus_client.registry import Collector

from config.connections import Connections
from web import group

HTTP_REQUESTS = Counter(
    "http_requests_total", "HTTP requests answered", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "http_request_duration_seconds",
    "HTTP request latency",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
HTTP_ERRORS = Counter("http_unhandled_errors_total", "Unexpected errors answered with 500")
RATELIMIT_REJECTED = Counter(
    "ratelimit_rejected_total", "Requests refused with 429 by the API rate limit", ["caller"]
)
RATELIMIT_FAILOPEN = Counter(
    "ratelimit_failopen_total", "Requests let through unchecked because Redis was unreachable"
)


#: Redis key (after ``REDIS_PREFIX``) naming the replica that exports the queue gauges.
QUEUE_EXPORTER_KEY = "metrics:queue-exporter"
#: How long the exporter keeps its lease after its last scrape (ms).
QUEUE_EXPORTER_TTL_MS = 120_000
# Take the lease if free, renew it if ours: 1 when this replica holds it.
_LEASE_LUA = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if holder then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


class QueueExporterLease:
    """Whether this process is the one web replica that exports the queue gauges (see the
    module's docstring). :meth:`held` blocks on Redis: call it off the event loop."""

    def __init__(self, ttl_ms: int = QUEUE_EXPORTER_TTL_MS) -> None:
        self.ttl_ms = ttl_ms
        self._token = secrets.token_hex(6)
        self._lock = threading.Lock()
        self._client: tuple[Connections, redis.Redis] | None = None

    @property
    def holder(self) -> str:
        """This process's name in the lease: host, pid and a random token; in a web group
        (``web/group.py``), the group's (its parent's pid and token), shared by its children."""
        return f"{socket.gethostname()}:{group.group() or f'{os.getpid()}:{self._token}'}"

    def held(self, connections: Connections) -> bool:
        """Take or renew the lease; False if another replica holds it or Redis is away."""
        with self._lock:
            if self._client is None or self._client[0] is not connections:
                self._client = (connections, connections.redis_sync())
            client = self._client[1]
        key = connections.settings.redis_prefix + QUEUE_EXPORTER_KEY
        try:
            return bool(client.eval(_LEASE_LUA, 1, key, self.holder, str(self.ttl_ms)))
        except (redis.RedisError, OSError):
            return False


QUEUE_EXPORTER = QueueExporterLease()


def scrape_registry(*own: Collector) -> CollectorRegistry:
    """What ``/metrics`` serves: the default registry; in a child of a web group, the merge
    of the group's multiprocess files plus ``own``, collectors of this process that the files
    do not hold (they are on the default registry too: the queue gauges)."""
    directory = group.metrics_dir()
    if directory is None:
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    for collector in own:
        registry.register(collector)
    return registry
