"""Leader election and once-per-slot firing, against the real Redis."""

from __future__ import annotations

import asyncio
from typing import Any

from apscheduler.triggers.interval import IntervalTrigger

from config.connections import Connections
from jobs.leader import LeaderLock
from jobs.schedule import SCHEDULE, ScheduledJob
from jobs.scheduler import Scheduler
from tests.conftest import bearer
from workers.broker import build_broker


async def test_one_leader_renewal_release_and_takeover(ctx: Any) -> None:
    key = ctx.key("scheduler", "leader")
    a, b = LeaderLock(ctx.redis, key, ttl_ms=400), LeaderLock(ctx.redis, key, ttl_ms=400)
    assert await a.tick() is True
    assert await b.tick() is False
    assert await a.holder() == a.instance
    await asyncio.sleep(0.25)
    assert await a.tick() is True  # renewed before expiry
    await asyncio.sleep(0.25)
    assert await b.tick() is False  # still held thanks to the renewal
    await a.release()
    assert await b.tick() is True
    # b dies without releasing: its lease runs out and a takes over.
    await asyncio.sleep(0.5)
    assert await a.tick() is True
    assert await b.tick() is False  # b learns it lost the lock and cannot renew
    assert b.is_leader is False


async def test_each_slot_fires_once_across_replicas(settings: Any, ctx: Any) -> None:
    platform = build_broker(Connections(settings))
    job = ScheduledJob("test-rollup", IntervalTrigger(hours=1), "rollup_analytics", "test", 3600)
    one = Scheduler(ctx, platform, schedule=(job,))
    two = Scheduler(ctx, platform, schedule=(job,))
    assert await one.lock.tick() is True
    assert await two.lock.tick() is False
    assert await two.fire("test-rollup") is None  # not the leader
    fire_key = await one.fire("test-rollup")
    assert fire_key is not None
    # A hand-over inside the same slot does not fire it again.
    await one.lock.release()
    assert await two.lock.tick() is True
    assert await two.fire("test-rollup") is None
    run = await ctx.store["job_runs"].find_one({"_id": fire_key})
    assert run["status"] == "enqueued" and run["job"] == "test-rollup"
    assert await ctx.store["job_runs"].count_documents({"job": "test-rollup"}) == 1
    queue = f"{settings.redis_prefix}dramatiq:maintenance"
    assert await ctx.redis.llen(queue) == 1


async def test_publish_feeds_the_admin_api(
    make_settings: Any, aiohttp_client: Any, worker_for: Any
) -> None:
    from web.app import CONTEXT, PLATFORM, create_app

    settings = make_settings(admin_email="ops@example.com", admin_password="ops password 1")
    app = create_app(settings)
    client = await aiohttp_client(app)
    scheduler = Scheduler(app[CONTEXT], app[PLATFORM])
    await scheduler.lock.tick()
    await scheduler.publish()
    login = await client.post(
        "/api/v1/auth/login", json={"email": "ops@example.com", "password": "ops password 1"}
    )
    admin = bearer((await login.json())["access_token"])
    resp = await client.get("/api/v1/admin/schedules", headers=admin)
    assert resp.status == 200
    body = await resp.json()
    assert body["leader"] == scheduler.lock.instance
    assert {i["name"] for i in body["items"]} == {job.name for job in SCHEDULE}
    assert all(i["next_run_at"] for i in body["items"])

    user = await client.post(
        "/api/v1/auth/register",
        json={"email": "u@example.com", "password": "user password", "name": "U"},
    )
    user_auth = bearer((await user.json())["access_token"])
    assert (await client.get("/api/v1/admin/schedules", headers=user_auth)).status == 403
    assert (await client.post("/api/v1/admin/schedules/nope/run", headers=admin)).status == 404

    worker_for(app)
    resp = await client.post("/api/v1/admin/schedules/analytics-rollup/run", headers=admin)
    assert resp.status == 202
    fire_key = (await resp.json())["fire_key"]
    for _ in range(100):
        run = await app[CONTEXT].store["job_runs"].find_one({"_id": fire_key})
        if run["status"] in ("succeeded", "failed"):
            break
        await asyncio.sleep(0.1)
    assert run["status"] == "succeeded", run
    listed = await (await client.get("/api/v1/admin/schedules", headers=admin)).json()
    last = next(i for i in listed["items"] if i["name"] == "analytics-rollup")["last_run"]
    assert last["fire_key"] == fire_key and last["manual"] is True
    assert last["duration_ms"] is not None
