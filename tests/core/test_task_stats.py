"""``core.tasks.compute_stats``: the counts of ``GET /tasks/stats`` and until when they hold,
from one aggregation over the owner's tasks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from core import tasks

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def _task(owner: str, status: str, priority: str, due: datetime | None) -> dict[str, Any]:
    return {
        "owner": owner,
        "status": status,
        "priority": priority,
        "due_key": due or tasks.NO_DUE,
    }


async def test_counts_overdue_due_today_and_the_next_boundary(ctx: Any) -> None:
    await ctx.store["tasks"].insert_many(
        [
            _task("u", "todo", "high", NOW - timedelta(hours=1)),  # overdue, due today
            _task("u", "in_progress", "low", NOW + timedelta(hours=1)),  # due today, next due
            _task("u", "done", "medium", NOW - timedelta(hours=2)),  # done: neither
            _task("u", "todo", "urgent", NOW + timedelta(days=1, hours=1)),  # tomorrow
            _task("u", "todo", "medium", None),  # no due date
            _task("other", "todo", "high", NOW - timedelta(hours=1)),  # another user's
        ]
    )
    stats, valid_until = await tasks.compute_stats(ctx, "u", NOW)
    assert stats.total == 5
    assert stats.by_status == {"todo": 3, "in_progress": 1, "done": 1}
    assert stats.by_priority == {"low": 1, "medium": 2, "high": 1, "urgent": 1}
    assert (stats.overdue, stats.due_today) == (1, 2)
    # The counts change when the next open task falls due (before midnight here).
    assert valid_until == (NOW + timedelta(hours=1, milliseconds=1)).timestamp()


async def test_without_open_due_tasks_the_counts_hold_until_midnight(ctx: Any) -> None:
    await ctx.store["tasks"].insert_many(
        [_task("u", "done", "low", NOW + timedelta(hours=1)), _task("u", "todo", "low", None)]
    )
    stats, valid_until = await tasks.compute_stats(ctx, "u", NOW)
    assert (stats.total, stats.overdue, stats.due_today) == (2, 0, 0)
    assert valid_until == datetime(2030, 1, 2, tzinfo=UTC).timestamp()
    empty, _ = await tasks.compute_stats(ctx, "nobody", NOW)
    assert (empty.total, empty.by_status["todo"], empty.by_priority["urgent"]) == (0, 0, 0)
