"""The broker, built in this one module: Redis by default, RabbitMQ for ``amqp://`` URLs,
fakeredis when no Redis is configured (the all-in-one default)."""

from __future__ import annotations

from typing import Any

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware.asyncio import AsyncIO

from config.connections import Connections
from workers.actors import declare_actors
from workers.resources import WorkerResources


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


def build_broker(connections: Connections) -> Platform:
    """Build the broker for ``connections.settings`` and declare every actor on it."""
    settings = connections.settings
    url = settings.effective_broker_url
    broker: dramatiq.Broker
    if url is not None and url.startswith(("amqp://", "amqps://")):
        broker = RabbitmqBroker(url=url)
    elif url is not None:
        broker = RedisBroker(url=url, namespace=f"{settings.redis_prefix}dramatiq")
    else:
        broker = RedisBroker(
            client=connections.redis_sync(), namespace=f"{settings.redis_prefix}dramatiq"
        )
    broker.add_middleware(AsyncIO())
    resources = WorkerResources(connections)
    broker.add_middleware(resources)
    actors = declare_actors(broker, resources)
    return Platform(broker, resources, actors)
