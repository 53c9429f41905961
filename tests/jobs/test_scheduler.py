"""Leader election, slots and catch-up, each slot fired once: against the real Redis and
the test MongoDB server."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from config.connections import Connections
from core import jobruns
from core.leader import LeaderLock
from core.store import utcnow
from jobs.schedule import ANCHOR, SCHEDULE, CatchUp, ScheduledJob, every
from jobs.scheduler import CATCH_UP_HORIZON, Scheduler, due_slots, fire_key, next_slot
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


def rollup_actor() -> str:
    """A real maintenance actor to send test fires to (no worker runs them here)."""
    return next(job.actor for job in SCHEDULE if job.name == "analytics-rollup")


def hourly(catch_up: CatchUp = "all") -> ScheduledJob:
    return ScheduledJob("test-hourly", every(hours=1), rollup_actor(), "test", catch_up=catch_up)


async def queued_fire_keys(ctx: Any) -> list[str]:
    """Fire keys of the messages waiting on the maintenance queue (the Redis broker's hash)."""
    raw = await ctx.redis.hvals(f"{ctx.settings.redis_prefix}dramatiq:maintenance.msgs")
    return sorted(json.loads(m)["args"][0]["fire_key"] for m in raw)


async def set_last_slot(ctx: Any, job: str, when: datetime) -> None:
    await ctx.store["schedules"].update_one(
        {"_id": job}, {"$set": {"last_slot": when}}, upsert=True
    )


def test_interval_slots_keep_their_phase_whenever_the_trigger_is_built() -> None:
    now = datetime(2031, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)
    first, later = every(minutes=5), every(minutes=5)
    assert next_slot(first, now) == next_slot(later, now) == datetime(2031, 5, 6, 7, 10, tzinfo=UTC)
    # Strictly after: a slot is never due twice.
    slot = datetime(2031, 5, 6, 7, 10, tzinfo=UTC)
    assert next_slot(first, slot) == slot + timedelta(minutes=5)
    # Every interval job of the schedule counts from the anchor, not from start-up.
    for job in SCHEDULE:
        if isinstance(job.trigger, IntervalTrigger):
            assert job.trigger.start_date == ANCHOR, job.name


def test_due_slots_are_those_after_the_last_and_up_to_now() -> None:
    cron = CronTrigger(hour="*/6", minute=15, timezone="UTC")
    last = datetime(2031, 1, 1, 0, 14, 55, tzinfo=UTC)  # a deploy just before 00:15
    now = datetime(2031, 1, 1, 12, 15, 0, tzinfo=UTC)
    assert due_slots(cron, last, now) == [
        datetime(2031, 1, 1, h, 15, tzinfo=UTC) for h in (0, 6, 12)
    ]
    assert due_slots(cron, now, now) == []
    # Nothing older than the horizon.
    long_ago = now - CATCH_UP_HORIZON * 3
    assert min(due_slots(cron, long_ago, now)) >= now - CATCH_UP_HORIZON


async def test_a_new_leader_fires_each_missed_slot_once(ctx: Any, settings: Any) -> None:
    platform = build_broker(Connections(settings))
    job = hourly("all")
    last = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=5)
    await set_last_slot(ctx, job.name, last)
    one = Scheduler(ctx, platform, schedule=(job,))
    two = Scheduler(ctx, platform, schedule=(job,))
    assert await one.lock.tick() is True
    await one.take_over()
    # A stalled leader (two, whose lease the clock says it still has) read the same pointer:
    # the claims in job_runs keep it from firing any slot again.
    two.lock.is_leader, two.lock.valid_until = True, one.lock.valid_until
    await two.take_over()
    expected = due_slots(job.trigger, last, utcnow())
    assert len(expected) >= 5
    fired = await one.fire_due()
    assert await two.fire_due() == []
    assert await one.fire_due() == []  # nothing more is due
    keys = [fire_key(job, slot) for slot in expected]
    assert fired == keys
    assert await queued_fire_keys(ctx) == sorted(keys)
    runs = await ctx.store["job_runs"].find({"job": job.name}).sort("scheduled_for", 1).to_list()
    assert [r["scheduled_for"] for r in runs] == expected
    assert all(r["sent_at"] and r["fired_by"] == one.lock.instance for r in runs)
    # The pointer is durable: the next leader starts from the last slot fired.
    doc = await ctx.store["schedules"].find_one({"_id": job.name})
    assert doc["last_slot"] == expected[-1]


async def test_latest_policy_fires_only_the_most_recent_missed_slot(
    ctx: Any, settings: Any
) -> None:
    platform = build_broker(Connections(settings))
    job = hourly("latest")
    last = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=5)
    await set_last_slot(ctx, job.name, last)
    leader = Scheduler(ctx, platform, schedule=(job,))
    await leader.lock.tick()
    await leader.take_over()
    expected = due_slots(job.trigger, last, utcnow())
    assert await leader.fire_due() == [fire_key(job, expected[-1])]
    assert await queued_fire_keys(ctx) == [fire_key(job, expected[-1])]


async def test_first_sight_of_a_job_fires_no_past_slot(ctx: Any, settings: Any) -> None:
    platform = build_broker(Connections(settings))
    job = hourly("all")
    leader = Scheduler(ctx, platform, schedule=(job,))
    await leader.lock.tick()
    await leader.take_over()
    assert await leader.fire_due() == []
    doc = await ctx.store["schedules"].find_one({"_id": job.name})
    assert abs((utcnow() - doc["last_slot"]).total_seconds()) < 5


async def test_a_claim_whose_message_was_not_sent_is_sent_by_the_next_leader(
    ctx: Any, settings: Any
) -> None:
    platform = build_broker(Connections(settings))
    job = hourly("all")
    slot = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    await set_last_slot(ctx, job.name, slot)
    # The previous leader claimed the slot and died before sending its message.
    key = fire_key(job, slot)
    assert await jobruns.claim(ctx, job.name, key, scheduled_for=slot, by="dead:1:abc")
    assert not await jobruns.claim(ctx, job.name, key, scheduled_for=slot, by="other:2:def")
    leader = Scheduler(ctx, platform, schedule=(job,))
    await leader.lock.tick()
    await leader.take_over()
    assert await leader.fire_due() == []  # no new slot is due
    assert await queued_fire_keys(ctx) == [key]
    run = await ctx.store["job_runs"].find_one({"_id": key})
    assert run["sent_at"] is not None and run["fired_by"] == "dead:1:abc"
    await leader.take_over()
    await leader.fire_due()
    assert await queued_fire_keys(ctx) == [key]  # sent once


async def test_a_stopped_scheduler_releases_the_lock_and_a_follower_takes_over(
    ctx: Any, settings: Any
) -> None:
    platform = build_broker(Connections(settings))
    job = ScheduledJob("test-tick", every(seconds=1), rollup_actor(), "test", catch_up="all")
    one = Scheduler(ctx, platform, schedule=(job,))
    two = Scheduler(ctx, platform, schedule=(job,), poll_seconds=0.2)
    first = asyncio.create_task(one.run())
    await wait_for(lambda: one.lock.leads, "the first scheduler to lead")
    second = asyncio.create_task(two.run())
    await wait_for(lambda: len(one.last_slot) == 1, "the first scheduler to take over")
    await asyncio.sleep(2.2)  # two or three slots
    one.stop()
    await asyncio.wait_for(first, 5)
    stopped = time.monotonic()
    await wait_for(lambda: two.lock.leads, "the follower to lead")
    assert time.monotonic() - stopped < 1.0
    await asyncio.sleep(2.2)
    two.stop()
    await asyncio.wait_for(second, 5)
    assert await ctx.redis.get(ctx.key("scheduler", "leader")) is None
    runs = await ctx.store["job_runs"].find({"job": job.name}).sort("scheduled_for", 1).to_list()
    slots = [r["scheduled_for"] for r in runs]
    assert len(slots) >= 4, runs
    # Every second between the first and the last slot, each once, by either scheduler.
    assert slots == [slots[0] + timedelta(seconds=i) for i in range(len(slots))]
    assert {r["fired_by"] for r in runs} == {one.lock.instance, two.lock.instance}
    assert await queued_fire_keys(ctx) == sorted(r["_id"] for r in runs)


async def wait_for(predicate: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_publish_feeds_the_admin_api(
    make_settings: Any, aiohttp_client: Any, worker_for: Any
) -> None:
    from web.app import create_app
    from web.keys import CONTEXT, PLATFORM

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
