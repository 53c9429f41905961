"""Search indexing actor: keeps a task's search entry in step with the task (core/search.py).

It reads the task as stored now rather than the event's snapshot and writes only over an older
version, so duplicates and out-of-order deliveries are harmless.
"""

from __future__ import annotations

from config.logging import get_logger
from core import search
from core.events import TaskEvent
from workers.actors import ActorContext

QUEUE = "search"
log = get_logger(__name__)


async def index_task(ctx: ActorContext, event: TaskEvent) -> None:
    """Index (or remove) the event's task as it is stored now."""
    outcome = await search.index_task(ctx, event.subject_id, event.user_id)
    log.debug("search.indexed", task_id=event.subject_id, outcome=outcome)
