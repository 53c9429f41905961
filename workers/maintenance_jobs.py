"""Bodies of the maintenance actors (one ``@maintenance`` function per scheduled job)."""

from __future__ import annotations

from typing import Any

from core.context import Context
from workers.maintenance import Run, maintenance
from workers.resources import WorkerResources


@maintenance
async def send_due_soon_reminders(ctx: Context, res: WorkerResources, run: Run) -> dict[str, Any]:
    """Remind users of open tasks due within their window (email and in-app)."""
    from core import notifications

    sent = await notifications.send_due_soon_reminders(ctx, res.mailer)
    return {"reminders": sent}


@maintenance
async def rollup_analytics(ctx: Context, res: WorkerResources, run: Run) -> dict[str, Any]:
    """Recompute the per-day analytics of yesterday and today."""
    from core import analytics

    days = await analytics.rollup_recent(ctx)
    return {"days": days}
