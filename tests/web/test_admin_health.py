"""Latency objectives (``/admin/queues``, ``/metrics``), ``GET /admin/health`` and
``GET /admin/overview``, over the app's real Redis broker, SecantusDB and an in-process worker;
and operator polling left out of the API rate limit."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from core.leader import LeaderLock
from jobs.schedule import SCHEDULE
from jobs.scheduler import Scheduler
from tests.conftest import bearer, eventually, register
from web.app import create_app
from web.keys import CONTEXT, PLATFORM

ADMIN = {"email": "root@example.com", "password": "admin password 1"}
API = "/api/v1/admin"


async def start(make_settings: Any, aiohttp_client: Any, **overrides: Any) -> Any:
    settings = make_settings(
        admin_email=ADMIN["email"], admin_password=ADMIN["password"], **overrides
    )
    app = create_app(settings)
    client = await aiohttp_client(app)
    resp = await client.post("/api/v1/auth/login", json=ADMIN)
    assert resp.status == 200, await resp.text()
    return app, client, bearer((await resp.json())["access_token"])


async def get(client: Any, auth: dict[str, str], path: str) -> Any:
    resp = await client.get(f"{API}/{path}", headers=auth)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def test_health_and_overview_need_the_admin_role(
    make_settings: Any, aiohttp_client: Any
) -> None:
    _, client, _ = await start(make_settings, aiohttp_client)
    user = await register(client)
    for path in ("health", "overview"):
        assert (await client.get(f"{API}/{path}")).status == 401
        resp = await client.get(f"{API}/{path}", headers=bearer(user["access_token"]))
        assert resp.status == 403


async def test_queues_carry_their_objective_and_metrics_export_it(
    make_settings: Any, aiohttp_client: Any
) -> None:
    _, client, auth = await start(
        make_settings, aiohttp_client, queue_latency_objectives="notifications=1,default=45"
    )

    # The admin's welcome waits in notifications (no worker runs): over 1 s after a while.
    async def breached() -> dict[str, Any] | None:
        rows = {q["queue"]: q for q in (await get(client, auth, "queues"))["items"]}
        row = rows["notifications"]
        return rows if row["ready"] == 1 and row["objective_met"] is False else None

    rows = await eventually(breached, "notifications over its objective")
    assert rows["notifications"]["objective_seconds"] == 1.0
    assert rows["notifications"]["oldest_age_seconds"] > 1.0
    assert rows["search"]["objective_seconds"] == 45.0  # not listed: the given default
    assert rows["search"]["objective_met"] is True

    resp = await client.get("/metrics")
    text = await resp.text()
    assert 'taskmanager_queue_latency_objective_seconds{queue="notifications"} 1.0' in text
    assert 'taskmanager_queue_latency_objective_seconds{queue="search"} 45.0' in text


async def test_health_checks_each_part_of_the_platform(
    make_settings: Any, aiohttp_client: Any, worker_for: Any
) -> None:
    app, client, auth = await start(
        make_settings, aiohttp_client, queue_latency_objectives="notifications=1"
    )
    ctx = app[CONTEXT]

    async def notifications_breached() -> dict[str, Any] | None:
        body = await get(client, auth, "health")
        return body if body["checks"]["queues"]["data"]["breached"] == ["notifications"] else None

    body = await eventually(notifications_breached, "notifications breached")
    checks = body["checks"]
    assert body["status"] == "failing"  # no live worker
    assert set(checks) == {"queues", "workers", "dead_letters", "outbox", "scheduler", "archiver"}
    assert checks["workers"]["status"] == "failing"
    assert checks["workers"]["detail"] == "no live worker process"
    assert checks["queues"]["status"] == "degraded"
    assert "notifications" in checks["queues"]["detail"]
    assert checks["dead_letters"] == {
        "status": "ok",
        "detail": "no dead letters",
        "data": {"total": 0, "by_queue": {}},
    }
    assert checks["scheduler"]["status"] == "degraded"
    assert checks["archiver"]["status"] == "unknown"  # no archiver ran with this BACKUP_DIR
    assert set(checks["outbox"]["data"]) == {"oldest_pending_age_seconds", "pending", "set_aside"}

    # A worker drains the queues, a scheduler replica leads: all well.
    worker_for(app)
    lock = LeaderLock(ctx.redis, ctx.key("scheduler", "leader"), ttl_ms=60_000)
    assert await lock.tick()

    async def ok() -> dict[str, Any] | None:
        body = await get(client, auth, "health")
        return body if body["status"] == "ok" else None

    body = await eventually(ok, "status ok", timeout=20)
    assert body["checks"]["workers"]["data"]["live"] == 1
    assert body["checks"]["workers"]["data"]["queues_without_worker"] == []
    assert body["checks"]["scheduler"]["data"] == {"leader": lock.instance}

    # A message that dies: one dead letter makes it degraded.
    actor = app[PLATFORM].actors["send_welcome_email"]
    await asyncio.to_thread(actor.send, {"id": "broken"})  # no event type: dies at once

    async def degraded() -> dict[str, Any] | None:
        body = await get(client, auth, "health")
        return body if body["checks"]["dead_letters"]["data"]["total"] == 1 else None

    body = await eventually(degraded, "a dead letter")
    assert body["status"] == "degraded"
    assert body["checks"]["dead_letters"]["data"]["by_queue"] == {"notifications": 1}
    await lock.release()


async def test_an_objective_naming_no_queue_is_reported(
    make_settings: Any, aiohttp_client: Any
) -> None:
    _, client, auth = await start(
        make_settings, aiohttp_client, queue_latency_objectives="notification=30,default=600"
    )
    check = (await get(client, auth, "health"))["checks"]["queues"]
    assert check["status"] == "degraded"
    assert check["data"]["unknown_objectives"] == ["notification"]
    assert "QUEUE_LATENCY_OBJECTIVES names no queue: notification" in check["detail"]


async def test_overview_has_every_section(
    make_settings: Any, aiohttp_client: Any, worker_for: Any
) -> None:
    app, client, auth = await start(make_settings, aiohttp_client)
    worker_for(app)
    # The schedule as a scheduler replica publishes it.
    await Scheduler(app[CONTEXT], app[PLATFORM]).publish()
    body = await get(client, auth, "overview")
    assert set(body) == {"queues", "workers", "health", "schedules", "history", "backlog"}
    queues = await get(client, auth, "queues")
    assert [q["queue"] for q in body["queues"]["items"]] == [q["queue"] for q in queues["items"]]
    assert all("objective_met" in q for q in body["queues"]["items"])
    assert body["health"]["status"] in ("ok", "degraded", "failing")
    schedules = {s["name"]: s for s in body["schedules"]}
    assert set(schedules) == {job.name for job in SCHEDULE}
    backup = schedules["backup"]
    assert backup["actor"] == "run_backup"
    assert backup["next_run_at"].endswith("Z")
    assert backup["last_status"] is None  # never ran
    assert isinstance(body["history"], dict) and isinstance(body["backlog"], dict)
    [worker] = await eventually(lambda: _workers(client, auth), "the worker")
    assert {"busy", "rss_bytes", "uptime_seconds", "processed", "failed"} <= set(worker)


async def _workers(client: Any, auth: dict[str, str]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = (await get(client, auth, "overview"))["workers"]["items"]
    return items


@pytest.mark.timeout(90)
async def test_polling_the_overview_is_not_charged_to_the_rate_limit(
    make_settings: Any, aiohttp_client: Any
) -> None:
    _, client, auth = await start(make_settings, aiohttp_client, rate_limit="5/minute")
    # Two minutes of a dashboard polling every second, within one window.
    for i in range(120):
        resp = await client.get(f"{API}/overview", headers=auth)
        assert resp.status == 200, (i, await resp.text())
    # The admin's own API budget is untouched, and the limiter does work.
    statuses = [(await client.get("/api/v1/me", headers=auth)).status for _ in range(6)]
    assert statuses == [200] * 5 + [429]
