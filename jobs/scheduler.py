"""The scheduler process: fires every slot of the schedule once, whichever replica leads.

A slot is a fire time of a job's APScheduler trigger. Only the replica holding the Redis
leader lock (:mod:`core.leader`) fires. The leader keeps, per job, the last slot it handled
(``last_slot`` in the job's ``schedules`` document, MongoDB); on taking over it reads them, and
on every pass it fires the slots due between that one and now, by the job's misfire policy
(:data:`jobs.schedule.CatchUp`), then sleeps until the next slot or lock renewal. Each fire
first claims the slot in ``job_runs`` under the key ``{job}:{slot}`` (:func:`core.jobruns.claim`),
so two leaders (a stalled one and its successor) never fire a slot twice; a claim whose message
was never sent (its scheduler died in between, or the broker refused it) is sent again on a
later pass or by the next leader.

Timings: the lock lives 6 s and is renewed every 2 s; followers try to take it every second.
A leader that dies is replaced within about 7 s; one that stops releases the lock, and a
follower takes over within a second. Missed slots further back than
:data:`CATCH_UP_HORIZON` are not fired; ``catch_up="all"`` fires at most :data:`CATCH_UP_MAX`.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta

from apscheduler.triggers.base import BaseTrigger

from config.logging import get_logger
from core import cancel, jobruns
from core.context import Context
from core.leader import LeaderLock
from core.store import utcnow
from jobs.schedule import SCHEDULE, ScheduledJob
from workers.broker import Platform
from workers.maintenance import enqueue_run

log = get_logger(__name__)

#: Missed slots older than this are not fired after an outage.
CATCH_UP_HORIZON = timedelta(days=1)
#: At most this many missed slots of a ``catch_up="all"`` job are fired (the latest ones).
CATCH_UP_MAX = 100
#: Lock lifetime; renewal every third of it.
LOCK_TTL_MS = 6_000
#: How often a follower tries to take the lock.
POLL_S = 1.0


def next_slot(trigger: BaseTrigger, after: datetime) -> datetime | None:
    """The first fire time of ``trigger`` strictly after ``after`` (UTC), None if none.

    Slots are whole seconds and ``after`` has millisecond precision, so "at or after
    ``after`` + 1 ms" is "strictly after"."""
    fire = trigger.get_next_fire_time(None, after + timedelta(milliseconds=1))
    return None if fire is None else fire.astimezone(UTC)


def due_slots(trigger: BaseTrigger, after: datetime, now: datetime) -> list[datetime]:
    """The slots of ``trigger`` in ``(after, now]``, oldest first, none older than
    :data:`CATCH_UP_HORIZON` before ``now``."""
    slots: list[datetime] = []
    slot = next_slot(trigger, max(after, now - CATCH_UP_HORIZON))
    while slot is not None and slot <= now:
        slots.append(slot)
        slot = next_slot(trigger, slot)
    return slots


def fire_key(job: ScheduledJob, slot: datetime) -> str:
    """The idempotency key of one slot of ``job`` (``backup:20250101T001500Z``)."""
    return f"{job.name}:{slot.astimezone(UTC):%Y%m%dT%H%M%SZ}"


class Scheduler:
    """Fires :data:`~jobs.schedule.SCHEDULE` while this instance leads."""

    def __init__(
        self,
        ctx: Context,
        platform: Platform,
        *,
        schedule: tuple[ScheduledJob, ...] | None = None,
        lock_ttl_ms: int = LOCK_TTL_MS,
        poll_seconds: float = POLL_S,
    ):
        self.ctx = ctx
        self.platform = platform
        self.schedule = SCHEDULE if schedule is None else schedule
        self.lock = LeaderLock(ctx.redis, ctx.key("scheduler", "leader"), ttl_ms=lock_ttl_ms)
        self.renew_seconds = lock_ttl_ms / 3000
        self.poll_seconds = poll_seconds
        #: Per job, the last slot handled; read from MongoDB on taking over.
        self.last_slot: dict[str, datetime] = {}
        self._ready = False  # pointers read since this instance took the lock
        self._sweep = False  # claims may be waiting for their message
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()  # set on stop and on leadership changes

    def stop(self) -> None:
        """Ask :meth:`run` to finish its pass, release the lock and return."""
        self._stopping.set()
        self._wake.set()

    async def take_over(self) -> None:
        """Read each job's last slot (first sight of a job: now) and plan a sweep of claims
        whose message may not have been sent."""
        now = utcnow()
        schedules = self.ctx.store["schedules"]
        for job in self.schedule:
            doc = await schedules.find_one({"_id": job.name}, {"last_slot": 1})
            last = None if doc is None else doc.get("last_slot")
            if last is None:  # a job no leader has seen: its slots start now
                last = now
                await schedules.update_one(
                    {"_id": job.name}, {"$max": {"last_slot": now}}, upsert=True
                )
            self.last_slot[job.name] = last.astimezone(UTC)
        self._ready = True
        self._sweep = True
        log.info(
            "scheduler.took_over",
            instance=self.lock.instance,
            last_slots={name: slot.isoformat() for name, slot in self.last_slot.items()},
        )

    async def fire_due(self) -> list[str]:
        """Fire every due slot (per misfire policy) while this instance leads; returns the
        fire keys sent."""
        if self._sweep:
            await self._resend_unsent()
        now = utcnow()
        fired: list[str] = []
        for job in self.schedule:
            slots = due_slots(job.trigger, self.last_slot[job.name], now)
            keep = 1 if job.catch_up == "latest" else CATCH_UP_MAX
            if len(slots) > keep:
                log.warning(
                    "scheduler.slots_skipped",
                    job=job.name,
                    skipped=len(slots) - keep,
                    policy=job.catch_up,
                    first=f"{slots[0]:%Y-%m-%dT%H:%M:%SZ}",
                )
                slots = slots[-keep:]
            for slot in slots:
                if not self.lock.leads:
                    return fired  # the lease may have run out: the next leader goes on
                key = await self._fire(job, slot)
                if key is not None:
                    fired.append(key)
        return fired

    async def _fire(self, job: ScheduledJob, slot: datetime) -> str | None:
        key = fire_key(job, slot)
        claimed = await jobruns.claim(
            self.ctx, job.name, key, scheduled_for=slot, by=self.lock.instance
        )
        sent = False
        if claimed:
            sent = await self._send(job.name, job.actor, key, slot)
        else:
            log.info("scheduler.slot_already_fired", job=job.name, fire_key=key)
        self.last_slot[job.name] = slot
        await self.ctx.store["schedules"].update_one(
            {"_id": job.name}, {"$max": {"last_slot": slot}}, upsert=True
        )
        return key if sent else None

    async def _send(
        self, job: str, actor: str, key: str, slot: datetime, *, resend: bool = False
    ) -> bool:
        try:
            await enqueue_run(
                self.ctx, self.platform.broker, job, actor, fire_key=key, scheduled_for=slot
            )
        except Exception:
            log.exception("scheduler.send_failed", job=job, fire_key=key)
            self._sweep = True  # sent again on the next pass
            return False
        await jobruns.mark_sent(self.ctx, key, resent_by=self.lock.instance if resend else None)
        log.info("scheduler.fired", job=job, fire_key=key)
        return True

    async def _resend_unsent(self) -> None:
        since = utcnow() - CATCH_UP_HORIZON
        self._sweep = False
        for job in self.schedule:
            for run in await jobruns.unsent(self.ctx, job.name, since=since):
                if not self.lock.leads:
                    self._sweep = True
                    return
                log.warning("scheduler.resending", job=job.name, fire_key=run["_id"])
                await self._send(job.name, job.actor, run["_id"], run["scheduled_for"], resend=True)

    def next_due(self) -> datetime | None:
        """The earliest slot not yet handled, over all jobs."""
        slots = [
            slot
            for job in self.schedule
            if (slot := next_slot(job.trigger, self.last_slot.get(job.name) or utcnow()))
        ]
        return min(slots, default=None)

    async def publish(self) -> None:
        """Write the schedule (trigger, next run, leader) where the API can read it."""
        now = utcnow()
        for job in self.schedule:
            await self.ctx.store["schedules"].update_one(
                {"_id": job.name},
                {
                    "$set": {
                        "trigger": str(job.trigger),
                        "actor": job.actor,
                        "description": job.description,
                        "catch_up": job.catch_up,
                        "next_run_at": next_slot(job.trigger, self.last_slot.get(job.name) or now),
                        "leader": self.lock.instance if self.lock.is_leader else None,
                        "published_at": now,
                    }
                },
                upsert=True,
            )

    async def run(self) -> None:
        """Until :meth:`stop` (or cancellation): hold or seek the lock, fire due slots while
        leading, publish the schedule; release the lock on the way out."""
        log.info("scheduler.started", instance=self.lock.instance, jobs=len(self.schedule))
        holder = asyncio.create_task(self._hold_lock(), name="scheduler-lock")
        try:
            while not self._stopping.is_set():
                cancel.checkpoint()  # a stop PyMongo swallowed (core/cancel.py)
                wait = await self._pass()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):  # not wait_for: see workers/relay.py
                        await self._wake.wait()
                self._wake.clear()
        finally:
            await cancel.stop(holder, 5)
            await self.lock.release()
            log.info("scheduler.stopped", instance=self.lock.instance)

    async def _hold_lock(self) -> None:
        """Renew the lock while leading, try to take it while following; wake the firing
        loop when leadership changes. Apart from firing, so a slow pass delays no renewal."""
        while True:
            was_leader = self.lock.is_leader
            try:
                leading = await self.lock.tick()
            except Exception:  # tick handles Redis errors; anything else must not end renewal
                log.exception("scheduler.lock_tick_failed", instance=self.lock.instance)
                leading = False
            if leading != was_leader:
                self._ready = False  # another leader may have fired meanwhile: re-read
                self._wake.set()
                with contextlib.suppress(Exception):
                    await self.publish()
            await cancel.pause(self.renew_seconds if leading else self.poll_seconds)

    async def _pass(self) -> float:
        """Fire what is due if leading; returns how long to wait before the next pass."""
        if not self.lock.leads:
            self._ready = False
            return self.poll_seconds
        try:
            took_over = not self._ready
            if took_over:
                await self.take_over()
            if await self.fire_due() or took_over:
                with contextlib.suppress(Exception):
                    await self.publish()
        except Exception:
            log.exception("scheduler.pass_failed", instance=self.lock.instance)
            return self.poll_seconds
        wait = self.renew_seconds  # look at the lease at least this often
        due = self.next_due()
        if due is not None:
            # A few ms late, so that the slot is due on waking.
            wait = min(wait, max(0.0, (due - utcnow()).total_seconds() + 0.005))
        return wait
