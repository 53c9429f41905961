"""``taskmanager backlog``: the users with the most messages waiting, per queue.

Counts what waits in the outbox (held back by fair dispatch, ``core/fairness.py``) and what was
sent and has not finished (``workers/backlog.py``), like ``GET /api/v1/admin/backlog``.
"""

from __future__ import annotations

from typing import Any

import click

from cli.common import echo_json, echo_table, load_settings, run_async
from config.connections import Connections
from config.logging import setup_logging
from core.context import open_context
from workers.backlog import backlog_summary


@click.command("backlog")
@click.option("--queue", default=None, help="Only this queue (default: every queue).")
@click.option(
    "--limit", type=click.IntRange(1, 100), default=10, show_default=True, help="Users per queue."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def backlog(queue: str | None, limit: int, as_json: bool) -> None:
    """Top users by messages waiting on each queue (outbox + broker)."""
    settings = load_settings(read_only=True)
    setup_logging(settings, process="cli")

    async def go() -> dict[str, Any]:
        async with open_context(settings, Connections(settings)) as ctx:
            return await backlog_summary(ctx, queue=queue, limit=limit)

    summary = run_async(go)
    if as_json:
        echo_json(summary)
        return
    queues: dict[str, list[dict[str, Any]]] = summary["queues"]
    if not queues:
        click.echo("nothing waiting")
        return
    echo_table(
        ["QUEUE", "USER", "WAITING", "OUTBOX", "IN BROKER"],
        [
            [name, str(r["user_id"]), str(r["waiting"]), str(r["outbox"]), str(r["in_broker"])]
            for name, rows in queues.items()
            for r in rows
        ],
    )
