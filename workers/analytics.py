"""Analytics actor: folds task events into the per-day counters (core/analytics.py).

Fed ``task.created``, ``task.completed`` and ``task.deleted``. Folding is guarded by the event
id in the same transaction as the increments, so a redelivered message counts once. The
per-day figures the API serves are rolled up from these counters by the ``rollup_analytics``
maintenance actor (scheduled job ``analytics-rollup``).
"""

from __future__ import annotations

from config.logging import get_logger
from core import analytics
from workers.actors import DeclareOne, Event, bind_event
from workers.resources import WorkerResources

QUEUE = "analytics"
log = get_logger(__name__)


def declare(declare_one: DeclareOne, res: WorkerResources) -> None:
    """Declare this concern's actors."""

    async def fold_analytics(event: Event) -> None:
        """Count the event on its day, for its user and for everyone (once per event id)."""
        bind_event(event)
        ctx = await res.context()
        folded = await analytics.fold_event(ctx, event)
        log.debug("analytics.folded", type=event.get("type"), folded=folded)

    declare_one(QUEUE, fold_analytics)
