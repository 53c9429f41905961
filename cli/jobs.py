"""Scheduler commands: ``scheduler``, ``schedules``, ``run-job``; and the in-process
scheduler of ``taskmanager run``."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import click
from aiohttp import web

from cli.common import echo_json, echo_table, iso, load_settings, run_async
from config.connections import Connections
from config.logging import setup_logging
from config.sentry import setup_sentry
from core import cancel, jobruns
from core.context import open_context
from jobs.schedule import SCHEDULE, by_name
from jobs.scheduler import Scheduler
from workers.broker import Platform, build_broker
from workers.maintenance import enqueue_run


def in_app(platform: Platform) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context running the scheduler inside a web app (``taskmanager run``)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        from web.keys import CONTEXT

        scheduler = Scheduler(app[CONTEXT], platform)
        task = asyncio.create_task(scheduler.run(), name="scheduler")
        yield
        # Finish the pass and release the lock, so another replica takes over at once.
        scheduler.stop()
        if not await cancel.stop(task, 10, cancel=False):
            await cancel.stop(task, 5)

    return ctx


@click.command()
def scheduler() -> None:
    """Fire scheduled jobs (safe to run several: one leader fires, each slot once)."""
    settings = load_settings(from_data_dir=False)
    setup_logging(settings, process="scheduler")
    setup_sentry(settings, process="scheduler")

    async def go() -> None:
        connections = Connections(settings)
        platform = build_broker(connections)
        async with open_context(settings, connections) as ctx:
            await ctx.store.ensure_indexes()
            scheduler = Scheduler(ctx, platform)
            loop = asyncio.get_running_loop()
            # A stop finishes the pass in progress and releases the leader lock, so another
            # replica takes over within a second.
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, scheduler.stop)
            await scheduler.run()

    run_async(go)


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def schedules(click_ctx: click.Context, as_json: bool) -> None:
    """The schedule: each job's trigger, next run, last run and the current leader
    (``schedules history NAME``: a job's latest runs).

    The next run is the one the scheduler computed and stored (``schedules`` collection,
    written by the leader from the job's trigger and the last slot it fired); ``-`` until a
    scheduler has published it. Times are UTC (ISO 8601)."""
    if click_ctx.invoked_subcommand is not None:
        return
    settings = load_settings(read_only=True)

    async def go() -> list[dict[str, Any]]:
        async with open_context(settings, Connections(settings)) as ctx:
            stored = {doc["_id"]: doc async for doc in ctx.store["schedules"].find()}
            rows = [
                {
                    "name": job.name,
                    "trigger": str(job.trigger),
                    "next": stored.get(job.name, {}).get("next_run_at"),
                    "last": await jobruns.latest(ctx, job.name),
                }
                for job in SCHEDULE
            ]
            leader = await ctx.redis.get(ctx.key("scheduler", "leader"))
            for row in rows:
                row["leader"] = leader.decode() if isinstance(leader, bytes) else "-"
            return rows

    rows = run_async(go)
    if as_json:
        echo_json([{**row, "last": _last_json(row["last"])} for row in rows])
        return
    echo_table(
        ["NAME", "TRIGGER", "NEXT", "LAST", "LEADER"],
        [
            [row["name"], row["trigger"], iso(row["next"]), _describe(row["last"]), row["leader"]]
            for row in rows
        ],
    )


@schedules.command("history")
@click.argument("name")
@click.option(
    "--limit", type=click.IntRange(1, 100), default=20, show_default=True, help="Runs to show."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def schedules_history(name: str, limit: int, as_json: bool) -> None:
    """A scheduled job's latest runs, newest first: the slot it fired for, status, start,
    duration and error (runs are kept 30 days). Exits 1 for a name not in the schedule."""
    from web.handlers.history import run_out

    names = [job.name for job in SCHEDULE]
    if name not in names:
        raise click.ClickException(
            f"no scheduled job named {name!r} (the schedule: {', '.join(names)})"
        )
    settings = load_settings(read_only=True)

    async def go() -> list[dict[str, Any]]:
        async with open_context(settings, Connections(settings)) as ctx:
            return await jobruns.recent(ctx, name, limit)

    runs = [run_out(run) for run in run_async(go)]
    if as_json:
        echo_json([run.model_dump() for run in runs])
        return
    if not runs:
        click.echo(f"{name}: no runs")
        return
    echo_table(
        ["FIRE KEY", "SCHEDULED", "STATUS", "STARTED", "DURATION", "MANUAL", "ERROR"],
        [
            [
                run.fire_key,
                iso(run.scheduled_for),
                run.status,
                iso(run.started_at),
                "-" if run.duration_seconds is None else f"{run.duration_seconds:.3f}s",
                "yes" if run.manual else "no",
                _one_line(run.error),
            ]
            for run in runs
        ],
    )


def _one_line(text: str | None, width: int = 60) -> str:
    if not text:
        return "-"
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def _last_json(run: dict[str, Any] | None) -> dict[str, Any] | None:
    if run is None:
        return None
    return {k: v for k, v in run.items() if k != "_id"} | {"id": str(run.get("_id", ""))}


def _describe(run: dict[str, Any] | None) -> str:
    if run is None:
        return "never"
    when = run.get("finished_at") or run.get("enqueued_at")
    return f"{run['status']} at {iso(when)} ({run.get('duration_ms', '-')} ms)"


@click.command("run-job")
@click.argument("name", type=click.Choice([job.name for job in SCHEDULE]))
def run_job(name: str) -> None:
    """Fire one scheduled job now (a worker runs it)."""
    settings = load_settings()
    job = by_name(name)

    async def go() -> str:
        connections = Connections(settings)
        platform = build_broker(connections)
        async with open_context(settings, connections) as ctx:
            return await enqueue_run(ctx, platform.broker, job.name, job.actor)

    click.echo(f"enqueued {name} as {run_async(go)}")
