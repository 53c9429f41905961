"""Search indexing actor: keeps a task's search entry in step with the task (core/search.py).

Fed ``task.created``, ``task.updated``, ``task.completed`` and ``task.deleted``. It reads the
task as stored now rather than the event's snapshot and writes only over an older version, so
duplicates and out-of-order deliveries are harmless.
"""

from __future__ import annotations

from config.logging import get_logger
from core import search
from workers.actors import DeclareOne, Event, bind_event
from workers.resources import WorkerResources

QUEUE = "search"
log = get_logger(__name__)


def declare(declare_one: DeclareOne, res: WorkerResources) -> None:
    """Declare this concern's actors."""

    async def index_task(event: Event) -> None:
        """Index (or remove) the event's task as it is stored now."""
        bind_event(event)
        ctx = await res.context()
        outcome = await search.index_task(ctx.store, event["subject_id"], event["user_id"])
        log.debug("search.indexed", task_id=event["subject_id"], outcome=outcome)

    declare_one(QUEUE, index_task)
