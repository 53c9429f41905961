"""Operator endpoints for queues, dead letters and workers, and the queue metrics.

The inspector (workers/queue_admin.py) talks to Redis or RabbitMQ synchronously: every call
runs on a thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Annotated, Any, TypeVar

from aiohttp import web
from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from config.connections import Connections
from config.logging import get_logger
from config.settings import Settings
from core import accounts
from core.errors import Unavailable
from core.events import OutboxLag, outbox_lag
from core.pagination import Page, PageQuery
from web.keys import CONNECTIONS, CONTEXT, PLATFORM
from web.metrics import QUEUE_EXPORTER
from web.routing import body, claims, json_response, query
from workers import health, queue_admin, registry
from workers.queue_inspector import backend_errors

log = get_logger(__name__)
T = TypeVar("T")

#: A queue-metrics reading is refreshed at most this often (s), and dropped when older than
#: ``STALE_AFTER`` (a dead Redis must not keep reporting the last numbers it gave).
REFRESH_EVERY = 1.0
STALE_AFTER = 30.0


class QueueOut(BaseModel):
    """One queue: where its messages are, and how long the next one has waited."""

    queue: str
    ready: int
    delayed: int
    in_progress: int | None = Field(description="Fetched by a worker, not yet acked")
    dead: int
    oldest_age_seconds: float | None = Field(description="Latency: age of the next message")
    paused: bool | None = Field(
        description="Paused: workers take none of its messages until it is resumed (None: "
        "the paused set could not be read)"
    )
    objective_seconds: float = Field(
        description="Latency objective: the longest the next message may wait "
        "(QUEUE_LATENCY_OBJECTIVES)"
    )
    objective_met: bool | None = Field(
        description="Whether the latency is within the objective (None: not reported)"
    )


class QueueList(BaseModel):
    """Every queue of the broker, and the outbox in front of them (events not yet sent)."""

    broker: str
    items: list[QueueOut]
    outbox: OutboxLag


# workers.queue_admin.DeadMessage is a dataclass: pydantic validates and documents it as is.
class DeadList(Page[queue_admin.DeadMessage]):
    """A page of a dead-letter queue, oldest first."""


class RetryIn(BaseModel):
    """Which dead letters to replay: ``ids`` (from the list), or all when omitted."""

    model_config = ConfigDict(extra="forbid")

    ids: list[Annotated[str, StringConstraints(min_length=1, max_length=200)]] | None = Field(
        None, max_length=1000
    )


class RetryOut(BaseModel):
    """What a replay did."""

    retried: int
    not_found: list[str]


class PurgeOut(BaseModel):
    """How many dead letters were dropped."""

    purged: int


class BusyOut(BaseModel):
    """A message a worker thread is running now (as of the worker's last beat)."""

    thread: str
    actor: str
    message_id: str
    queue: str
    args_summary: str = Field(description="Arguments, shortened; secret-looking values masked")
    started_at: datetime
    running_seconds: float


class WorkerOut(BaseModel):
    """One live worker process."""

    id: str
    host: str
    pid: int
    queues: list[str]
    threads: int
    state: str = Field(description="starting, running or stopping (draining after SIGTERM)")
    started_at: datetime
    last_beat: datetime
    heartbeat_age_seconds: float
    in_flight: int
    processed: int = Field(description="Messages run since the process started")
    failed: int = Field(description="Failed attempts since the process started")
    busy: list[BusyOut] = Field(description="What each busy thread runs, longest running first")
    rss_bytes: int | None = Field(description="Resident memory of the process")
    uptime_seconds: float


class WorkerList(BaseModel):
    """Workers whose registration is alive."""

    items: list[WorkerOut]


async def revoke_sessions(request: web.Request) -> web.Response:
    """End every login of a user now: its access tokens are refused from the next request,
    its refresh tokens too (404 for an unknown user; 503 if the denylist is unreachable, in
    which case nothing was revoked and the call can be repeated)."""
    ctx = request.app[CONTEXT]
    user = await accounts.get_user(ctx, request.match_info["user_id"])
    count = await accounts.revoke_user_logins(ctx, str(user["_id"]))
    log.info(
        "admin.sessions_revoked",
        user_id=str(user["_id"]),
        by=claims(request).subject,
        logins=count,
    )
    return web.Response(status=204)


def _inspector(request: web.Request) -> queue_admin.QueueInspector:
    return request.app[PLATFORM].inspector


async def _call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    # No deadline here: the clients have socket timeouts, and waiting for a free thread is
    # not the broker's fault.
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except backend_errors() as exc:
        raise Unavailable(f"The broker is unreachable: {type(exc).__name__}") from exc


def queue_out(settings: Settings, stats: queue_admin.QueueStats) -> QueueOut:
    """One queue's row, with its latency objective (workers/health.py)."""
    goal = health.objective(settings, stats)
    return QueueOut.model_validate(
        {
            **dataclasses.asdict(stats),
            "objective_seconds": goal.objective_seconds,
            "objective_met": goal.met,
        }
    )


async def queue_list(app: web.Application) -> QueueList:
    """What ``GET /admin/queues`` answers (the overview's ``queues`` too)."""
    inspector = app[PLATFORM].inspector
    stats = await _call(inspector.stats)
    settings = app[CONNECTIONS].settings
    return QueueList(
        broker=inspector.kind,
        items=[queue_out(settings, s) for s in stats],
        outbox=await outbox_lag(app[CONTEXT]),
    )


async def list_queues(request: web.Request) -> web.Response:
    """Per queue: ready, delayed, in progress, dead-lettered, latency and its objective."""
    return json_response(await queue_list(request.app))


class DeadQuery(PageQuery):
    """A dead-letter list's page, optionally filtered (filters and cursor go together)."""

    actor: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = Field(
        None, description="Only this actor's dead letters"
    )
    error: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = Field(
        None, description="Only those whose error or traceback contains this (any case)"
    )


async def list_dead(request: web.Request) -> web.Response:
    """A page of a queue's dead letters, oldest first (filtered by actor and error)."""
    q = query(request, DeadQuery)
    inspector = _inspector(request)
    page = await _call(
        inspector.dead,
        request.match_info["queue"],
        limit=q.limit,
        cursor=q.cursor,
        actor=q.actor,
        error=q.error,
    )
    return json_response(DeadList(items=page.items, next_cursor=page.next_cursor))


async def retry_dead(request: web.Request) -> web.Response:
    """Replay dead letters (all, or ``ids``) as fresh messages; safe to repeat."""
    ids = body(request, RetryIn).ids
    result = await _call(_inspector(request).retry, request.match_info["queue"], ids)
    log.info("admin.dead_retried", queue=request.match_info["queue"], retried=result.retried)
    return json_response(RetryOut(retried=result.retried, not_found=result.not_found))


async def purge_dead(request: web.Request) -> web.Response:
    """Drop every dead letter of a queue."""
    purged = await _call(_inspector(request).purge, request.match_info["queue"])
    log.info("admin.dead_purged", queue=request.match_info["queue"], purged=purged)
    return json_response(PurgeOut(purged=purged))


async def worker_list(app: web.Application) -> WorkerList:
    """What ``GET /admin/workers`` answers (the overview's ``workers`` too)."""
    connections = app[CONNECTIONS]
    prefix = connections.settings.redis_prefix

    def read() -> list[registry.WorkerInfo]:
        client = connections.redis_sync()
        try:
            return registry.list_workers(client, prefix)
        finally:
            client.close()

    workers = await _call(read)
    return WorkerList(items=[WorkerOut.model_validate(w, from_attributes=True) for w in workers])


async def list_workers(request: web.Request) -> web.Response:
    """Live workers: heartbeat age, in-flight count, and what each busy thread runs."""
    return json_response(await worker_list(request.app))


# -- Prometheus -------------------------------------------------------------------------------


class QueueMetrics(Collector):
    """``taskmanager_queue_messages{queue,state}``, ``taskmanager_queue_oldest_age_seconds``
    and ``taskmanager_queue_latency_objective_seconds`` (``QUEUE_LATENCY_OBJECTIVES``, which the
    TaskmanagerQueueAgeOverObjective alert compares the age with) from the last reading;
    :func:`refresh_queue_metrics` takes a new one off the loop."""

    def __init__(self) -> None:
        self.reading: tuple[float, list[queue_admin.QueueStats]] | None = None
        self._busy = threading.Lock()
        self._source: queue_admin.QueueInspector | None = None
        #: The objectives' source (the settings of the last refresh given ``connections``).
        self._settings: Settings | None = None

    def refresh(
        self, inspector: queue_admin.QueueInspector, connections: Connections | None = None
    ) -> None:
        """Read the queues (blocking: run it on a thread). At most one read at a time, so a
        hung broker holds one thread, not one per scrape. Given ``connections``, only if this
        replica holds the queue-exporter lease (``web/metrics.py``: one replica exports)."""
        if not self._busy.acquire(blocking=False):
            return
        try:
            if connections is not None:
                self._settings = connections.settings
                if not QUEUE_EXPORTER.held(connections):
                    self.reading = None  # another replica exports the queue gauges
                    return
            if (
                self.reading is not None
                and self._source is inspector
                and time.monotonic() - self.reading[0] < REFRESH_EVERY
            ):
                return
            self.reading = (time.monotonic(), inspector.stats())
            self._source = inspector
        except backend_errors() as exc:
            log.warning("metrics.queues_unreadable", error=type(exc).__name__)
        finally:
            self._busy.release()

    def collect(self) -> Iterator[Metric]:
        """The metric families (fresh readings only)."""
        reading = self.reading
        fresh = reading is not None and time.monotonic() - reading[0] < STALE_AFTER
        up = GaugeMetricFamily(
            "taskmanager_queue_stats_up",
            "1 if this replica exports the queue gauges and read them in the last 30 s",
        )
        up.add_metric([], 1.0 if fresh else 0.0)
        yield up
        if reading is None or not fresh:
            return
        messages = GaugeMetricFamily(
            "taskmanager_queue_messages",
            "Messages per queue and state (ready, delayed, in_progress, dead)",
            labels=["queue", "state"],
        )
        age = GaugeMetricFamily(
            "taskmanager_queue_oldest_age_seconds",
            "How long the next message of the queue has waited",
            labels=["queue"],
        )
        paused = GaugeMetricFamily(
            "taskmanager_queue_paused",
            "1 while the queue is paused (workers take none of its messages)",
            labels=["queue"],
        )
        objective = GaugeMetricFamily(
            "taskmanager_queue_latency_objective_seconds",
            "The longest the next message of the queue may wait (QUEUE_LATENCY_OBJECTIVES)",
            labels=["queue"],
        )
        settings = self._settings
        for s in reading[1]:
            if settings is not None:
                objective.add_metric([s.queue], settings.latency_objective(s.queue))
            for state, value in (
                ("ready", s.ready),
                ("delayed", s.delayed),
                ("in_progress", s.in_progress),
                ("dead", s.dead),
            ):
                if value is not None:
                    messages.add_metric([s.queue, state], float(value))
            if s.oldest_age_seconds is not None:
                age.add_metric([s.queue], s.oldest_age_seconds)
            if s.paused is not None:
                paused.add_metric([s.queue], 1.0 if s.paused else 0.0)
        yield messages
        yield age
        yield paused
        yield objective


QUEUE_METRICS = QueueMetrics()
REGISTRY.register(QUEUE_METRICS)


async def refresh_queue_metrics(app: web.Application) -> None:
    """Take a fresh queue reading for ``/metrics`` on a thread; a slow broker delays the scrape
    by at most a second and then the last reading (or none) is served."""
    try:
        await asyncio.wait_for(
            asyncio.to_thread(QUEUE_METRICS.refresh, app[PLATFORM].inspector, app[CONNECTIONS]),
            1.0,
        )
    except TimeoutError:
        log.warning("metrics.queues_slow")
