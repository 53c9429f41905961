"""The schedule: what runs when. Each scheduled job enqueues one message of a maintenance
actor; the work itself happens on workers."""

from __future__ import annotations

from dataclasses import dataclass

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger


@dataclass(frozen=True)
class ScheduledJob:
    """One entry of the schedule."""

    name: str
    trigger: BaseTrigger
    actor: str
    description: str
    #: Width of a fire slot in seconds: fires of the same job within one slot share an
    #: idempotency key, so a leader hand-over can never fire a slot twice.
    slot_seconds: int


SCHEDULE: tuple[ScheduledJob, ...] = (
    ScheduledJob(
        "due-soon-reminders",
        IntervalTrigger(minutes=5, timezone="UTC"),
        "send_due_soon_reminders",
        "Email and notify users about open tasks due within their reminder window",
        slot_seconds=300,
    ),
    ScheduledJob(
        "analytics-rollup",
        CronTrigger(minute=5, timezone="UTC"),
        "rollup_analytics",
        "Fold yesterday's and today's events into per-day analytics",
        slot_seconds=3600,
    ),
    ScheduledJob(
        "backup",
        # On the clock, not every 6 h from start-up: an interval restarts with every
        # scheduler deploy, and deploys more often than every 6 h would starve it.
        CronTrigger(hour="*/6", minute=15, timezone="UTC"),
        "run_backup",
        "Full logical backup of the database into BACKUP_DIR; prunes beyond BACKUP_KEEP",
        slot_seconds=6 * 3600,
    ),
)


def by_name(name: str) -> ScheduledJob | None:
    """The scheduled job called ``name``."""
    return next((job for job in SCHEDULE if job.name == name), None)
