"""``taskmanager reindex``: rebuild the search index from MongoDB."""

from __future__ import annotations

import sys

import click

from cli.common import load_settings, run_async
from config.connections import Connections
from config.logging import setup_logging


@click.command()
@click.option("--user", "user_id", default=None, help="Only this user's tasks (a user id).")
@click.option("--batch-size", type=click.IntRange(1, 10_000), default=500, show_default=True)
def reindex(user_id: str | None, batch_size: int) -> None:
    """Rebuild the search index from MongoDB (safe while the platform serves)."""
    from tqdm import tqdm  # type: ignore[import-untyped]

    from core import search
    from core.context import open_context

    settings = load_settings(need_services=False)
    if not settings.mongodb_url:
        raise click.ClickException("MONGODB_URL must be set")
    setup_logging(settings, process="cli")

    async def go() -> search.ReindexResult:
        async with open_context(settings, Connections(settings)) as ctx:
            await ctx.store.ensure_indexes()
            total = await search.count_tasks(ctx, user_id)
            with tqdm(total=total, unit="task", desc="reindex", file=sys.stderr) as bar:
                return await search.reindex(
                    ctx, user_id, batch_size=batch_size, progress=bar.update
                )

    result = run_async(go)
    click.echo(
        f"indexed {result.tasks} tasks ({result.written} entries written, "
        f"{result.removed} of deleted tasks removed) in {result.seconds:.1f} s"
    )
