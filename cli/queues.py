"""Queue operations: ``taskmanager queues``, ``dead list|retry|purge`` and ``healthcheck
worker`` (the queue administration itself is :mod:`workers.queue_admin`)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from cli.common import broker_settings, echo_json, echo_table, iso, load_settings, or_dash
from config.connections import Connections

T = TypeVar("T")


def _inspector() -> Any:
    from workers.broker import build_broker

    # Nothing here signs anything: no JWT_SECRET needed (cursors are read back by us).
    return build_broker(Connections(broker_settings())).inspector


def _backend_call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    from core.errors import AppError
    from workers.queue_inspector import backend_errors

    try:
        return fn(*args, **kwargs)
    except AppError as exc:
        raise click.ClickException(exc.detail) from exc
    except backend_errors() as exc:
        raise click.ClickException(f"the broker is unreachable: {exc}") from exc


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "--max-age",
    type=click.FloatRange(min=0),
    default=None,
    metavar="SECONDS",
    help="Exit 1 when a queue's next message has waited longer (for alerting scripts).",
)
@click.pass_context
def queues(ctx: click.Context, as_json: bool, max_age: float | None) -> None:
    """Per queue: ready, delayed, in progress, dead-lettered, latency of the next message
    (a paused queue is marked [paused]). Subcommands browse, pause and resume a queue.

    Exit status: 0, or 1 when --max-age is given and a queue's latency exceeds it (the
    breached queues are named on stderr)."""
    import dataclasses

    if ctx.invoked_subcommand is not None:
        return
    inspector = _inspector()
    stats = _backend_call(inspector.stats)
    breached = [
        s.queue for s in stats if max_age is not None and (s.oldest_age_seconds or 0.0) > max_age
    ]
    from workers.health import objective  # latency objective (QUEUE_LATENCY_OBJECTIVES)

    settings = broker_settings()
    goals = {s.queue: objective(settings, s) for s in stats}
    if as_json:
        echo_json(
            [
                {
                    **dataclasses.asdict(s),
                    "objective_seconds": goals[s.queue].objective_seconds,
                    "objective_met": goals[s.queue].met,
                }
                for s in stats
            ]
        )
        _exit_on_breach(breached, max_age)
        return
    echo_table(
        ["QUEUE", "READY", "DELAYED", "IN PROGRESS", "DEAD", "LATENCY", "OBJECTIVE"],
        [
            [
                s.queue + (" [paused]" if s.paused else ""),
                str(s.ready),
                str(s.delayed),
                or_dash(s.in_progress),
                str(s.dead),
                "-" if s.oldest_age_seconds is None else f"{s.oldest_age_seconds:.1f}s",
                f"{goals[s.queue].objective_seconds:g}s "
                + {True: "met", False: "BREACHED", None: "-"}[goals[s.queue].met],
            ]
            for s in stats
        ],
    )
    _echo_outbox()
    _exit_on_breach(breached, max_age)


def _exit_on_breach(breached: list[str], max_age: float | None) -> None:
    if breached:
        click.echo(f"breach: {', '.join(breached)} waited longer than {max_age:g}s", err=True)
        sys.exit(1)


def _echo_outbox() -> None:
    """The outbox's line under the queue table, when MongoDB is configured (a stalled relay
    shows here: events pile up before any queue)."""
    from cli.common import run_async
    from core.context import open_context
    from core.events import outbox_lag

    settings = load_settings(need_services=False, read_only=True)
    if not settings.mongodb_url or not settings.redis_url:
        return

    async def go() -> str:
        async with open_context(settings, Connections(settings)) as ctx:
            lag = await outbox_lag(ctx)
        age = lag.oldest_pending_age_seconds
        return (
            f"outbox: {lag.pending} event(s) pending, oldest "
            f"{'-' if age is None else f'{age:.1f}s'}, {lag.set_aside} set aside "
            "(taskmanager outbox status)"
        )

    click.echo(run_async(go))


@click.group()
def dead() -> None:
    """Dead-lettered messages: list, replay, purge."""


@dead.command("list")
@click.argument("queue_arg", metavar="[QUEUE]", required=False)
@click.option("--queue", "-q", "queue", default=None, help="One queue (default: all).")
@click.option("--actor", default=None, help="Only this actor's dead letters.")
@click.option("--error", default=None, help="Only those whose error or traceback contains this.")
@click.option("--limit", type=click.IntRange(1, 200), default=50, show_default=True)
@click.option("--cursor", default=None, help="Continue after a previous page.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def dead_list(
    queue_arg: str | None,
    queue: str | None,
    actor: str | None,
    error: str | None,
    limit: int,
    cursor: str | None,
    as_json: bool,
) -> None:
    """List dead letters, oldest first (of QUEUE, or every queue), filtered by --actor and
    --error (a case-insensitive substring of the error or traceback)."""
    import dataclasses

    if queue_arg and queue and queue_arg != queue:
        raise click.UsageError("give the queue once (QUEUE or --queue)")
    queue = queue or queue_arg
    inspector = _inspector()
    names = [queue] if queue else list(inspector.queues)
    items = []
    next_cursor = None
    for name in names:
        page = _backend_call(
            inspector.dead,
            name,
            limit=limit,
            cursor=cursor if queue else None,
            actor=actor,
            error=error,
        )
        items += page.items
        next_cursor = page.next_cursor if queue else None
    if as_json:
        echo_json({"items": [dataclasses.asdict(m) for m in items], "next_cursor": next_cursor})
        return
    if not items:
        click.echo("no dead letters")
        return
    echo_table(
        ["ID", "QUEUE", "ACTOR", "FAILED AT", "RETRIES", "ERROR"],
        [
            [
                m.id,
                m.queue,
                m.actor,
                iso(m.failed_at),
                str(m.retries),
                (m.error or "-")[:80],
            ]
            for m in items
        ],
    )
    if next_cursor:
        click.echo(f"more: --cursor {next_cursor}")


@dead.command("retry")
@click.option("--queue", "-q", "queue", required=True)
@click.option("--ids", multiple=True, help="Ids from `dead list` (repeatable, or comma-separated).")
@click.option("--all", "retry_all", is_flag=True, help="Every dead letter of the queue.")
def dead_retry(queue: str, ids: tuple[str, ...], retry_all: bool) -> None:
    """Put dead letters back on their queue as fresh messages (safe to repeat).

    Exit status 1 when one of --ids is not in the dead-letter queue (the others are retried)."""
    wanted = [i.strip() for chunk in ids for i in chunk.split(",") if i.strip()]
    if bool(wanted) == retry_all:
        raise click.UsageError("give either --ids or --all")
    result = _backend_call(_inspector().retry, queue, None if retry_all else wanted)
    click.echo(f"retried {result.retried} message(s) on {queue}")
    if result.not_found:
        click.echo(f"not in the dead-letter queue: {', '.join(result.not_found)}", err=True)
        sys.exit(1)


@dead.command("purge")
@click.option("--queue", "-q", "queue", default=None)
@click.option("--all", "purge_all", is_flag=True, help="Every queue.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def dead_purge(queue: str | None, purge_all: bool, yes: bool) -> None:
    """Drop dead letters for good."""
    if (queue is None) != purge_all:
        raise click.UsageError("give either --queue or --all")
    inspector = _inspector()
    names: list[str] = [queue] if queue is not None else list(inspector.queues)
    counts = {s.queue: s.dead for s in _backend_call(inspector.stats)}
    for name in names:
        if name not in counts:
            raise click.ClickException(f"No queue named {name!r}")
    total = sum(counts[n] for n in names)
    if not yes:
        click.confirm(
            f"Purge {total} dead letter(s) of {', '.join(names)}? This cannot be undone",
            abort=True,
        )
    purged = sum(_backend_call(inspector.purge, name) for name in names)
    click.echo(f"purged {purged} dead letter(s)")


@click.group()
def healthcheck() -> None:
    """Probes for container health checks (exit 0 healthy, 1 not)."""


@healthcheck.command("worker")
@click.option("--max-age", type=float, default=30.0, show_default=True, help="Seconds.")
def healthcheck_worker(max_age: float) -> None:
    """Whether a worker on this host has beaten within --max-age seconds."""
    import socket

    import redis

    from workers.registry import host_has_live_worker

    settings = load_settings(need_services=False, read_only=True)
    if settings.redis_url is None:
        raise click.ClickException("REDIS_URL must be set")
    client = Connections(settings).redis_sync()
    host = socket.gethostname()
    try:
        alive = host_has_live_worker(client, settings.redis_prefix, host=host, max_age=max_age)
    except redis.RedisError as exc:
        click.echo(f"unhealthy: redis unreachable ({exc})", err=True)
        sys.exit(1)
    finally:
        client.close()
    if not alive:
        click.echo(f"unhealthy: no worker on {host} beat within {max_age:g} s", err=True)
        sys.exit(1)
    click.echo(f"healthy: a worker on {host} is beating")
