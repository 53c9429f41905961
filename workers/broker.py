"""The broker, built in this one module: Redis by default, RabbitMQ for ``amqp://`` URLs,
fakeredis when no Redis is configured (the all-in-one default).

Queues are split into two pools: :data:`WEBHOOK_QUEUES` (deliveries, whose latency depends on
other people's servers) and :func:`general_queues` (everything else). ``taskmanager run`` gives
each its own threads (:mod:`workers.pools`); deployments run one ``worker`` process per pool
(Procfile, docker-compose.yml, deploy/k8s).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import q_name
from dramatiq.middleware.asyncio import AsyncIO

from config.connections import Connections
from workers.actors import Catalogue, declare_actors
from workers.catalogue import CATALOGUE
from workers.dead_letter_notes import DeadLetterNotes
from workers.heartbeat import WorkerHeartbeat
from workers.history import HistoryRecorder
from workers.metrics import WorkerMetrics
from workers.middleware import MessageContext, OutboxReceipts
from workers.pause import QueuePause
from workers.queue_admin import QueueInspector, build_inspector
from workers.queue_messages import DelayedReleaseGuard
from workers.resources import WorkerResources
from workers.webhooks import QUEUES as WEBHOOK_QUEUES
from workers.webhooks import RetryRefund

__all__ = ["WEBHOOK_QUEUES", "Platform", "build_broker", "general_queues"]


class Platform:
    """A broker with our actors declared on it, and the resources they use."""

    def __init__(
        self,
        broker: dramatiq.Broker,
        resources: WorkerResources,
        actors: dict[str, dramatiq.Actor[Any, Any]],
    ):
        self.broker = broker
        self.resources = resources
        self.actors = actors

    def close(self) -> None:
        """Close the broker's connections (Dramatiq's Redis broker leaves its pool open)."""
        self.broker.close()
        client = getattr(self.broker, "client", None)
        if client is not None:
            client.connection_pool.disconnect()

    @cached_property
    def inspector(self) -> QueueInspector:
        """Reads and manages this broker's queues (counts, dead letters; workers/queue_admin.py)."""
        return build_inspector(self.broker, self.resources.connections)


def build_broker(connections: Connections, catalogue: Catalogue = CATALOGUE) -> Platform:
    """Build the broker for ``connections.settings`` and declare the catalogue's actors on it
    (:class:`~workers.actors.CatalogueError` when the catalogue is inconsistent)."""
    catalogue.check()  # before any client is made
    settings = connections.settings
    url = settings.effective_broker_url
    broker: dramatiq.Broker
    if url is not None and url.startswith(("amqp://", "amqps://")):
        # Imported here: only a RabbitMQ deployment's processes load pika.
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        broker = RabbitmqBroker(url=url)
    else:
        broker = RedisBroker(client=connections.broker_redis(), **_redis_options(connections))
    # First, before Dramatiq's own: a paused queue's message or a superseded delayed copy is
    # skipped before any other middleware starts on it (workers/pause.py, queue_messages.py).
    first = type(broker.middleware[0])
    broker.add_middleware(QueuePause(connections), before=first)
    broker.add_middleware(DelayedReleaseGuard(), before=first)
    broker.add_middleware(AsyncIO())
    broker.add_middleware(MessageContext())
    broker.add_middleware(WorkerMetrics(port=settings.worker_metrics_port))
    resources = WorkerResources(connections)
    resources.broker = broker
    broker.add_middleware(resources)
    broker.add_middleware(WorkerHeartbeat(connections))
    broker.add_middleware(HistoryRecorder(connections))
    broker.add_middleware(DeadLetterNotes(connections))
    broker.add_middleware(RetryRefund())
    # Last: its after_worker_shutdown (hooks run in reverse) flushes receipts before the
    # resources close the MongoDB client and AsyncIO stops the event loop.
    broker.add_middleware(OutboxReceipts(resources))
    actors = declare_actors(broker, resources, catalogue)
    return Platform(broker, resources, actors)


def general_queues(broker: dramatiq.Broker) -> set[str]:
    """Every declared queue but the webhook ones (delay and dead-letter names aside)."""
    return {q_name(q) for q in broker.get_declared_queues()} - WEBHOOK_QUEUES


def _redis_options(connections: Connections) -> dict[str, Any]:
    settings = connections.settings
    return {
        "namespace": f"{settings.redis_prefix}dramatiq",
        # Workers beat every second (workers/heartbeat.py), so a short timeout is safe, and
        # their sweeper makes recovery deterministic; the random maintenance stays a backstop.
        "heartbeat_timeout": settings.worker_heartbeat_timeout_ms,
    }
