"""``taskmanager health`` (exit 0 when ok, 1 when degraded or failing; ``--json``) and the
latency objective in ``taskmanager queues``, over real Redis, SecantusDB and an in-process
worker; no ``JWT_SECRET`` needed."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from dramatiq import Worker

from config.connections import Connections
from config.settings import Settings
from core.leader import LeaderLock
from tests.cli.conftest import invoke
from workers.broker import Platform


def lead_scheduler(settings: Settings) -> str:
    """Take the scheduler's leader lock as a scheduler replica does; returns its instance."""

    async def take() -> str:
        redis = Connections(settings).redis()
        try:
            lock = LeaderLock(redis, f"{settings.redis_prefix}scheduler:leader", ttl_ms=60_000)
            assert await lock.tick()
            return lock.instance
        finally:
            await redis.aclose()

    return asyncio.run(take())


def test_health_fails_without_workers_and_is_ok_once_all_is_well(
    ops_env: Settings, platform: Platform
) -> None:
    result = invoke("health")
    assert result.exit_code == 1, result.output
    rows = {line.split()[0]: line.split()[1] for line in result.output.splitlines()[1:-1]}
    assert rows == {
        "queues": "ok",
        "workers": "failing",
        "dead_letters": "ok",
        "outbox": "ok",
        "scheduler": "degraded",
        "archiver": "unknown",
    }
    assert result.output.splitlines()[-1] == "status: failing"
    body = json.loads(invoke("health", "--json").output)
    assert body["status"] == "failing"
    assert body["checks"]["workers"]["detail"] == "no live worker process"

    leader = lead_scheduler(ops_env)
    worker = Worker(platform.broker, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        deadline = time.monotonic() + 15
        while (result := invoke("health")).exit_code != 0:
            assert time.monotonic() < deadline, result.output
            time.sleep(0.2)
        assert result.output.splitlines()[-1] == "status: ok"
        body = json.loads(invoke("health", "--json").output)
        assert body["checks"]["scheduler"]["data"]["leader"] == leader
        assert body["checks"]["workers"]["data"]["live"] == 1
    finally:
        worker.stop(timeout=10_000)


def test_queues_show_each_objective_met_or_breached(
    ops_env: Settings, platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUEUE_LATENCY_OBJECTIVES", "notifications=0.2,default=3600")
    platform.actors["send_welcome_email"].send({})
    time.sleep(0.4)
    result = invoke("queues")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[-1] == "OBJECTIVE"
    rows = {line.split()[0]: line for line in lines[1:]}
    assert rows["notifications"].endswith("0.2s BREACHED")
    assert rows["search"].endswith("3600s met")
    items = {q["queue"]: q for q in json.loads(invoke("queues", "--json").output)}
    assert items["notifications"]["objective_seconds"] == 0.2
    assert items["notifications"]["objective_met"] is False
    assert items["search"]["objective_met"] is True

    degraded = invoke("health", "--json")
    assert degraded.exit_code == 1
    assert json.loads(degraded.output)["checks"]["queues"]["data"]["breached"] == ["notifications"]


def test_a_bad_objective_setting_is_refused_naming_the_item(
    ops_env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUEUE_LATENCY_OBJECTIVES", "notifications=60,webhooks=soon")
    result = invoke("queues")
    assert result.exit_code == 1
    assert "QUEUE_LATENCY_OBJECTIVES item 'webhooks=soon'" in result.output
