"""Analytics actor: folds task events into the per-day counters (core/analytics.py).

Folding is guarded by the event id in the same transaction as the increments, so a redelivered
message counts once. The per-day figures the API serves are rolled up from these counters by
the ``rollup_analytics`` maintenance actor (scheduled job ``analytics-rollup``).
"""

from __future__ import annotations

from config.logging import get_logger
from core import analytics
from core.events import TaskEvent
from workers.actors import ActorContext

QUEUE = "analytics"
log = get_logger(__name__)


async def fold_analytics(ctx: ActorContext, event: TaskEvent) -> None:
    """Count the event on its day, for its user and for everyone (once per event id)."""
    folded = await analytics.fold_event(ctx, event)
    log.debug("analytics.folded", type=event.type.value, folded=folded)
