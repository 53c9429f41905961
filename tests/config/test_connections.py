"""Every client is made by config/connections.py, with the timeouts declared there."""

from __future__ import annotations

from typing import Any

from config.connections import (
    REDIS_CONNECT_TIMEOUT,
    REDIS_SYNC_TIMEOUT,
    REDIS_TIMEOUT,
    Connections,
)
from workers.broker import build_broker
from workers.queue_admin import RedisQueueInspector


def _timeouts(client: Any) -> tuple[float, float]:
    kwargs = client.connection_pool.connection_kwargs
    return kwargs["socket_connect_timeout"], kwargs["socket_timeout"]


async def test_redis_clients_carry_the_declared_timeouts(make_settings: Any) -> None:
    settings = make_settings(broker_url="redis://127.0.0.1:6390/3")
    connections = Connections(settings)
    asyncio_client = connections.redis()
    sync_client = connections.redis_sync()
    broker_client = connections.broker_redis()
    try:
        assert _timeouts(asyncio_client) == (REDIS_CONNECT_TIMEOUT, REDIS_TIMEOUT)
        assert _timeouts(sync_client) == (REDIS_CONNECT_TIMEOUT, REDIS_SYNC_TIMEOUT)
        assert _timeouts(broker_client) == (REDIS_CONNECT_TIMEOUT, REDIS_SYNC_TIMEOUT)
        # The broker's client is of BROKER_URL, the others of REDIS_URL.
        assert broker_client.connection_pool.connection_kwargs["port"] == 6390
        assert broker_client.connection_pool.connection_kwargs["db"] == 3
    finally:
        await asyncio_client.aclose()
        sync_client.close()
        broker_client.close()


async def test_mongodb_client_waits_mongodb_timeout_ms(make_settings: Any) -> None:
    settings = make_settings(mongodb_timeout_ms=1234)
    client = Connections(settings).mongo()
    try:
        assert client.options.server_selection_timeout == 1.234
        assert client.options.pool_options.connect_timeout == 1.234
    finally:
        await client.close()


def test_the_broker_and_its_inspector_use_clients_with_timeouts(make_settings: Any) -> None:
    """Dramatiq would build a client without timeouts from a URL: a hung Redis would block
    its consumers, the heartbeat and the relay's sends forever."""
    platform = build_broker(Connections(make_settings()))
    try:
        assert _timeouts(platform.broker.client) == (REDIS_CONNECT_TIMEOUT, REDIS_SYNC_TIMEOUT)
        inspector = platform.inspector
        assert isinstance(inspector, RedisQueueInspector)
        assert _timeouts(inspector.client) == (REDIS_CONNECT_TIMEOUT, REDIS_SYNC_TIMEOUT)
    finally:
        platform.close()
