"""``taskmanager outbox``: the outbox's lag, and the events the relay set aside."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

import click

from cli.common import echo_json, echo_table, iso, load_settings, or_dash, run_async
from config.connections import Connections
from config.logging import setup_logging
from core import events
from core.context import Context, open_context

T = TypeVar("T")


def _with_context(fn: Callable[[Context], Awaitable[T]], *, read_only: bool = False) -> T:
    settings = load_settings(read_only=read_only)
    setup_logging(settings, process="cli")

    async def go() -> T:
        async with open_context(settings, Connections(settings)) as ctx:
            await ctx.store.ensure_indexes()
            return await fn(ctx)

    return run_async(go)


@click.group()
def outbox() -> None:
    """The outbox: lag, and events set aside after repeated send failures."""


@outbox.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def outbox_status(as_json: bool) -> None:
    """Pending events, the age of the oldest, and events set aside."""
    lag = _with_context(events.outbox_lag, read_only=True)
    if as_json:
        click.echo(lag.model_dump_json(indent=2))
        return
    age = lag.oldest_pending_age_seconds
    click.echo(f"pending    {lag.pending}")
    click.echo(f"oldest     {'-' if age is None else f'{age:.1f}s'}")
    click.echo(f"set aside  {lag.set_aside}")


@outbox.command("list-set-aside")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def outbox_list_set_aside(limit: int, as_json: bool) -> None:
    """Events set aside, the earliest first: id, type, attempts, last error."""
    items = _with_context(lambda ctx: events.list_set_aside(ctx, limit=limit), read_only=True)
    if as_json:
        echo_json([i.model_dump() for i in items])
        return
    if not items:
        click.echo("no events set aside")
        return
    echo_table(
        ["ID", "TYPE", "SUBJECT", "SET ASIDE AT", "ATTEMPTS", "ERROR"],
        [
            [
                i.id,
                or_dash(i.type),
                or_dash(i.subject_id),
                iso(i.set_aside_at),
                str(i.attempts),
                (i.error or "-")[:80],
            ]
            for i in items
        ],
    )


@outbox.command("replay")
@click.option(
    "--ids", multiple=True, help="Ids from `list-set-aside` (repeatable or comma-separated)."
)
@click.option("--all", "replay_all", is_flag=True, help="Every event set aside.")
def outbox_replay(ids: tuple[str, ...], replay_all: bool) -> None:
    """Put set-aside events back in the outbox with their attempts reset (safe to repeat).

    Exit status 1 when one of --ids is not set aside (the others are replayed)."""
    wanted = [i.strip() for chunk in ids for i in chunk.split(",") if i.strip()]
    if bool(wanted) == replay_all:
        raise click.UsageError("give either --ids or --all")
    result = _with_context(lambda ctx: events.replay_set_aside(ctx, None if replay_all else wanted))
    click.echo(f"replayed {len(result.replayed)} event(s)")
    if result.not_found:
        click.echo(f"not set aside: {', '.join(result.not_found)}", err=True)
        sys.exit(1)
