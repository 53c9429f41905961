"""The scheduler process: APScheduler 3.11 fires the schedule; only the Redis-elected leader
enqueues, and every fire is keyed so a slot runs once however many replicas run.

APScheduler 3.x cannot share a job store between processes (its FAQ says so), hence the lock:
each replica keeps its own in-memory schedule, and leadership decides who acts on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from config.logging import get_logger
from core.context import Context
from core.store import utcnow
from jobs.leader import LeaderLock
from jobs.schedule import SCHEDULE, ScheduledJob
from workers.broker import Platform
from workers.maintenance import enqueue_run

log = get_logger(__name__)


class Scheduler:
    """Fires :data:`~jobs.schedule.SCHEDULE` while this instance leads."""

    def __init__(
        self,
        ctx: Context,
        platform: Platform,
        *,
        schedule: tuple[ScheduledJob, ...] = SCHEDULE,
        lock_ttl_ms: int = 15_000,
    ):
        self.ctx = ctx
        self.platform = platform
        self.schedule = schedule
        self.lock = LeaderLock(ctx.redis, ctx.key("scheduler", "leader"), ttl_ms=lock_ttl_ms)
        self.aps = AsyncIOScheduler(timezone=UTC)
        for job in schedule:
            self.aps.add_job(
                self.fire,
                job.trigger,
                args=[job.name],
                id=job.name,
                name=job.name,
                coalesce=True,
                max_instances=1,
                misfire_grace_time=max(60, job.slot_seconds // 2),
            )

    async def fire(self, name: str) -> str | None:
        """Fire a scheduled slot of ``name`` if this instance leads and nobody fired it yet."""
        job = _find(self.schedule, name)
        if job is None or not self.lock.is_leader:
            return None
        slot = int(time.time() // job.slot_seconds)
        fire_key = f"{job.name}:{slot}"
        first = await self.ctx.redis.set(
            self.ctx.key("fired", fire_key),
            self.lock.instance,
            nx=True,
            ex=max(2 * job.slot_seconds, 3600),
        )
        if not first:
            log.info("scheduler.slot_already_fired", job=job.name, fire_key=fire_key)
            return None
        scheduled_for = datetime.fromtimestamp(slot * job.slot_seconds, UTC)
        await enqueue_run(
            self.ctx,
            self.platform.broker,
            job.name,
            job.actor,
            fire_key=fire_key,
            scheduled_for=scheduled_for,
        )
        log.info("scheduler.fired", job=job.name, fire_key=fire_key)
        await self.publish()
        return fire_key

    async def publish(self) -> None:
        """Write the schedule (trigger, next run, leader) where the API can read it."""
        now = utcnow()
        for job in self.schedule:
            aps_job = self.aps.get_job(job.name)
            # A job has no next_run_time until the scheduler has started.
            next_run = getattr(aps_job, "next_run_time", None)
            if next_run is None:
                next_run = job.trigger.get_next_fire_time(None, now)
            await self.ctx.store["schedules"].update_one(
                {"_id": job.name},
                {
                    "$set": {
                        "trigger": str(job.trigger),
                        "actor": job.actor,
                        "description": job.description,
                        "next_run_at": next_run,
                        "leader": self.lock.instance if self.lock.is_leader else None,
                        "published_at": now,
                    }
                },
                upsert=True,
            )

    async def run(self, *, tick_seconds: float | None = None) -> None:
        """Run until cancelled: renew leadership, let APScheduler fire, publish the state."""
        tick = tick_seconds or self.lock.ttl_ms / 3000
        self.aps.start()
        log.info("scheduler.started", instance=self.lock.instance, jobs=len(self.schedule))
        try:
            while True:
                was_leader = self.lock.is_leader
                leading = await self.lock.tick()
                if leading != was_leader or leading:
                    with contextlib.suppress(Exception):
                        await self.publish()
                await asyncio.sleep(tick)
        finally:
            self.aps.shutdown(wait=False)
            await self.lock.release()
            log.info("scheduler.stopped", instance=self.lock.instance)


def _find(schedule: tuple[ScheduledJob, ...], name: str) -> ScheduledJob | None:
    return next((job for job in schedule if job.name == name), None)
