"""``taskmanager archiver`` (continuous archiving of change events) and the point-in-time half
of ``taskmanager backup restore --at T`` (:mod:`core.archive`)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from datetime import datetime
from typing import Any

import click

from cli.common import load_settings, run_async
from config.connections import Connections
from config.logging import get_logger, setup_logging
from config.settings import Settings
from core import archive, archive_metrics
from core import restore as restoring
from core.context import Context, open_context
from core.errors import AppError

log = get_logger(__name__)


@click.command()
def archiver() -> None:
    """Archive change events into BACKUP_DIR/archive every ARCHIVE_INTERVAL seconds (safe to
    run several: one leader archives); metrics on HOST:ARCHIVER_METRICS_PORT/metrics."""
    settings = load_settings()
    setup_logging(settings, process="archiver")

    async def go() -> None:
        async with open_context(settings, Connections(settings)) as ctx:
            archiver = archive.Archiver(ctx)
            server = None
            if settings.archiver_metrics_port:
                try:
                    server = archive_metrics.serve(
                        archiver, settings.host, settings.archiver_metrics_port
                    )
                except OSError as exc:
                    # Archiving matters more than its metrics (the lag alert then fires).
                    log.warning(
                        "archive.metrics_unavailable",
                        host=settings.host,
                        port=settings.archiver_metrics_port,
                        error=str(exc),
                    )
            task = asyncio.create_task(archiver.run())
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, task.cancel)
            try:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            finally:
                if server is not None:
                    server.shutdown()
                    server.server_close()

    run_async(go)


def _moment(at: str) -> datetime:
    try:
        return archive.parse_moment(at)
    except ValueError as exc:
        raise click.BadParameter(f"{at!r} is not an ISO 8601 moment", param_hint="--at") from exc


def verify_at(at: str, settings: Settings | None = None) -> None:
    """``backup verify --at AT``: check the full backup and every segment a restore to AT
    would use, writing nothing (exit 1 naming the file or the moment otherwise). ``settings``:
    those of the caller (``BACKUP_DIR`` a folder downloaded from a target, say)."""
    if settings is None:
        settings = load_settings(need_services=False)
        setup_logging(settings, process="cli")
    moment = _moment(at)
    try:
        chosen = archive.plan(settings, moment, None)
    except AppError as exc:
        raise click.ClickException(exc.detail) from exc
    report = restoring.verify(chosen.backup.path)
    problems = report.problems
    if problems:
        for problem in problems:
            click.echo(f"problem: {problem}", err=True)
        raise click.ClickException(f"full backup {chosen.backup.id}: {len(problems)} problem(s)")
    click.echo(
        f"{moment.isoformat()}: restorable from full backup {chosen.backup.id} plus "
        f"{chosen.events} events in {len(chosen.segments)} segment(s) of chain "
        f"{chosen.chain.path.name} (all checked)"
    )


def restore_at(
    at: str, into: str | None, drop: bool, yes: bool, settings: Settings | None = None
) -> None:
    """``backup restore --at AT [--into DB] [--drop] [--yes]``; ``settings``: those of the
    caller (``BACKUP_DIR`` a folder downloaded from a target, say)."""
    if settings is None:
        settings = load_settings()
        setup_logging(settings, process="cli")
    moment = _moment(at)
    target = into or settings.mongodb_db
    try:
        chosen = archive.plan(settings, moment, None)
    except AppError as exc:
        raise click.ClickException(exc.detail) from exc
    click.echo(
        f"restore {target!r} to {moment.isoformat()}: full backup {chosen.backup.id} plus "
        f"{chosen.events} events in {len(chosen.segments)} segment(s) of chain "
        f"{chosen.chain.path.name} (all checked)",
        err=True,
    )
    if drop:
        click.echo(f"WARNING: --drop replaces every collection of {target!r}", err=True)
    if not yes:
        click.confirm("Proceed?", abort=True, err=True)

    bars: dict[str, Any] = {}

    def progress(stage: str, done: int, total: int) -> None:
        from tqdm import tqdm  # type: ignore[import-untyped]

        bar = bars.get(stage)
        if bar is None:
            for old in bars.values():
                old.close()
            bar = bars[stage] = tqdm(total=total, unit="doc", desc=stage, file=sys.stderr)
        bar.total = max(total, done)
        bar.update(done - bar.n)

    async def go() -> archive.PitrResult:
        async with open_context(settings, Connections(settings)) as ctx:
            return await _work(ctx)

    async def _work(ctx: Context) -> archive.PitrResult:
        return await archive.restore_at(ctx, moment, target, drop=drop, progress=progress)

    try:
        result = run_async(go)
    except AppError as exc:
        raise click.ClickException(exc.detail) from exc
    finally:
        for bar in bars.values():
            bar.close()
    click.echo(
        f"restored {result.database!r} to {result.at.isoformat()}: {result.documents} documents "
        f"(backup {result.backup} + {result.events_applied} events, {result.events_skipped} "
        f"already in the dump) in {result.seconds:.1f} s"
    )
