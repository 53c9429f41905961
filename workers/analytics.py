"""Analytics actor: folds task events into the per-day counters (core/analytics.py).

A fold is one insert keyed by the event id, so a redelivered message counts once. The
``rollup_analytics`` maintenance actor (scheduled job ``analytics-rollup``) adds the folds to
the per-day counters and rolls those up into the figures the API serves.
"""

from __future__ import annotations

from config.logging import get_logger
from core import analytics
from core.events import TaskEvent
from workers.actors import ActorContext

QUEUE = "analytics"
log = get_logger(__name__)


async def fold_analytics(ctx: ActorContext, event: TaskEvent) -> None:
    """Count the event on its user's day (once per event id; the rollup adds it up)."""
    folded = await analytics.fold_event(ctx, event)
    log.debug("analytics.folded", type=event.type.value, folded=folded)
