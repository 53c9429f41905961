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


# A full logical backup of a large database outlasts the default 30 minutes.
@maintenance(time_limit_ms=6 * 3600_000)
async def run_backup(ctx: Context, res: WorkerResources, run: Run) -> dict[str, Any]:
    """Take a full backup: the one requested over HTTP (``backup_id``) or a scheduled one."""
    from datetime import datetime

    from core import backups

    backup_id = run.get("backup_id") or backups.id_for_fire(
        run["fire_key"], datetime.fromisoformat(run["scheduled_for"])
    )
    result = await backups.create(ctx, backup_id, fire_key=run["fire_key"])
    return {
        "backup_id": result.id,
        "collections": len(result.collections),
        "documents": result.documents,
        "bytes": result.size,
        "read_mode": result.read_mode,
        "pruned": result.pruned,
    }
