"""The schedule: what runs when. Each scheduled job enqueues one message of a maintenance
actor; the work itself happens on workers.

Slots are the fire times of each job's trigger. Interval triggers are anchored at
:data:`ANCHOR` (use :func:`every`), so a job's slots are the same whichever scheduler replica
leads and however often the scheduler restarts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from workers.catalogue import CATALOGUE

#: Where every interval trigger starts counting, so its slots keep their phase.
ANCHOR = datetime(2000, 1, 1, tzinfo=UTC)

#: What the leader does with slots that fell due while no scheduler led (a hand-over, an
#: outage): ``"latest"`` fires the most recent missed slot once and skips the older ones (for
#: jobs whose run covers everything up to now: reminders, rollups, backups); ``"all"`` fires
#: every missed slot, oldest first, each once.
CatchUp = Literal["latest", "all"]


def every(**interval: int) -> IntervalTrigger:
    """An interval trigger anchored at :data:`ANCHOR` (``every(minutes=5)``)."""
    return IntervalTrigger(**interval, start_date=ANCHOR, timezone="UTC")


@dataclass(frozen=True)
class ScheduledJob:
    """One entry of the schedule."""

    name: str
    trigger: BaseTrigger
    #: The maintenance actor a run is a message of: ``CATALOGUE.schedule[name]``
    #: (workers/catalogue.py), where the broker's start-up check sees it.
    actor: str
    description: str
    #: Misfire policy: which missed slots are fired after a hand-over (see :data:`CatchUp`).
    catch_up: CatchUp = "latest"


SCHEDULE: tuple[ScheduledJob, ...] = (
    ScheduledJob(
        "due-soon-reminders",
        every(minutes=5),
        CATALOGUE.schedule["due-soon-reminders"],
        "Email and notify users about open tasks due within their reminder window",
    ),
    ScheduledJob(
        "analytics-rollup",
        CronTrigger(minute=5, timezone="UTC"),
        CATALOGUE.schedule["analytics-rollup"],
        "Fold yesterday's and today's events into per-day analytics",
    ),
    ScheduledJob(
        "backup",
        # On the clock, not every 6 h from start-up: an interval restarts with every
        # scheduler deploy, and deploys more often than every 6 h would starve it.
        CronTrigger(hour="*/6", minute=15, timezone="UTC"),
        CATALOGUE.schedule["backup"],
        "Full logical backup of the database into BACKUP_DIR; prunes beyond BACKUP_KEEP",
    ),
)


def by_name(name: str) -> ScheduledJob:
    """The scheduled job called ``name``; :class:`KeyError` when there is none."""
    for job in SCHEDULE:
        if job.name == name:
            return job
    raise KeyError(name)
