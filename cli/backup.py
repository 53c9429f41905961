"""``taskmanager backup create|list|verify|restore``: full backups from the operator's shell.

``create`` takes the backup in this process (the scheduled and HTTP-requested ones run on a
worker); every command reads ``BACKUP_DIR`` from the environment like the other processes.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from cli.common import echo_table, load_settings, run_async
from config.connections import Connections
from config.logging import setup_logging
from config.settings import Settings
from core import (
    archive,
    backup_format,
    backup_replication,
    backup_targets,
    backups,
    restore,
)
from core.context import Context, open_context
from core.errors import AppError
from core.pagination import PageQuery

T = TypeVar("T")


def _settings() -> Settings:
    settings = load_settings()
    setup_logging(settings, process="cli")
    return settings


def load_settings_for_files() -> Settings:
    """Settings for commands that only read ``BACKUP_DIR`` (no database needed)."""
    settings = load_settings(need_services=False)
    setup_logging(settings, process="cli")
    return settings


def _run(settings: Settings, work: Callable[[Context], Awaitable[T]]) -> T:
    """Run ``work`` with a context on a fresh loop; domain errors become readable exits."""

    async def go() -> T:
        async with open_context(settings, Connections(settings)) as ctx:
            return await work(ctx)

    try:
        return run_async(go)
    except AppError as exc:
        raise click.ClickException(exc.detail) from exc


@contextmanager
def _bars(verb: str = "") -> Iterator[backup_format.Progress]:
    """A progress callback drawing one tqdm bar per collection on stderr."""
    from tqdm import tqdm  # type: ignore[import-untyped]

    current: dict[str, Any] = {}

    def progress(collection: str, done: int, total: int) -> None:
        bar: Any = current.get("bar")
        if current.get("name") != collection:
            if bar is not None:
                bar.close()
            desc = f"{verb} {collection}".strip()
            bar = tqdm(total=total, unit="doc", desc=desc, file=sys.stderr)
            current.update(name=collection, bar=bar)
        bar.total = max(total, done)
        bar.update(done - bar.n)

    try:
        yield progress
    finally:
        if current.get("bar") is not None:
            current["bar"].close()


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@click.group()
def backup() -> None:
    """Full backups of the database: create, list, verify, restore."""


@backup.command("create")
def backup_create() -> None:
    """Take a full backup now, in this process (BACKUP_DIR/<id>/)."""
    settings = _settings()

    async def work(ctx: Context) -> backups.BackupResult:
        with _bars() as progress:
            return await backups.create(ctx, progress=progress)

    result = _run(settings, work)
    click.echo(
        f"backup {result.id}: {result.documents} documents in {len(result.collections)} "
        f"collections, {_size(result.size)} ({result.read_mode} reads)"
    )
    click.echo(f"path {result.path}")
    if result.pruned:
        click.echo(f"pruned {len(result.pruned)} older backup(s): {', '.join(result.pruned)}")
    _echo_reports(result.replicated)


def _echo_reports(reports: list[backup_replication.SyncReport]) -> None:
    for r in reports:
        if r.ok:
            click.echo(
                f"target {r.target} ({r.where}): up to date; uploaded {len(r.uploaded_fulls)} "
                f"full backup(s), {r.uploaded_segments} segment(s), {_size(r.bytes)}; deleted "
                f"{len(r.deleted_fulls)} full backup(s), {r.deleted_segments} segment(s)"
            )
        else:
            click.echo(
                f"target {r.target} ({r.where}): replication FAILED ({r.error}); the local "
                "backup is complete, `taskmanager backup replicate` catches up",
                err=True,
            )


@backup.command("replicate")
@click.option(
    "--target", "only", multiple=True, help="Only this target (primary, offsite); repeatable."
)
def backup_replicate(only: tuple[str, ...]) -> None:
    """Copy to the remote targets (BACKUP_TARGET, BACKUP_OFFSITE_TARGET) what they lack of
    BACKUP_DIR (full backups, manifest last; archive segments), then apply each one's
    retention; exit 1 when a target failed."""
    settings = load_settings_for_files()
    try:
        configured = backup_targets.remote_targets(settings)
    except backup_targets.TargetError as exc:
        raise click.ClickException(str(exc)) from exc
    if not configured:
        raise click.ClickException(
            "no remote target: set BACKUP_TARGET (and BACKUP_OFFSITE_TARGET)"
        )
    reports = backup_replication.replicate(settings, only or None)
    _echo_reports(reports)
    if not all(r.ok for r in reports):
        sys.exit(1)


@backup.command("list")
@click.option("--limit", type=click.IntRange(1, 200), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def backup_list(limit: int, as_json: bool) -> None:
    """Backups, newest first: the catalogue, plus directories found in BACKUP_DIR; then the
    restorable window(s) of point-in-time restore (full backups plus the archive)."""
    import json

    settings = _settings()

    async def work(ctx: Context) -> list[backups.BackupPublic]:
        return (await backups.page(ctx, PageQuery(limit=limit))).items

    records = {r.id: r for r in _run(settings, work)}
    disk = {d.id: d for d in backups.scan(settings)}
    remote = _remote_holdings(settings)
    rows = [
        _row(backup_id, records.get(backup_id), disk.get(backup_id))
        for backup_id in sorted(set(records) | set(disk), reverse=True)[:limit]
    ]
    for row in rows:
        held = ["local"] if row["on_disk"] == "complete" else []
        row["targets"] = held + [n for n, h in remote.items() if h and row["id"] in h.fulls]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    windows = archive.windows(settings)
    if not rows:
        click.echo(f"no backups (BACKUP_DIR={settings.backup_dir})")
    else:
        _backup_table(rows)
    _echo_windows(windows)
    _echo_targets(settings, remote)


def _remote_holdings(settings: Settings) -> dict[str, backup_replication.Holdings | None]:
    """What each remote target holds (``None``: it could not be listed)."""
    out: dict[str, backup_replication.Holdings | None] = {}
    try:
        configured = backup_targets.remote_targets(settings)
    except backup_targets.TargetError as exc:
        click.echo(f"targets: {exc}", err=True)
        return out
    for target in configured:
        try:
            out[target.name] = backup_replication.holdings(target.keys())
        except Exception as exc:
            out[target.name] = None
            click.echo(f"target {target.name}: not listed ({type(exc).__name__}: {exc})", err=True)
        finally:
            target.close()
    return out


def _echo_targets(
    settings: Settings, remote: dict[str, backup_replication.Holdings | None]
) -> None:
    """One line per remote target: what it holds, its last replication and last failure."""
    status = backup_replication.read_status(settings)
    for name, held in remote.items():
        entry = status.get(name, {})
        holds = (
            "unreachable now"
            if held is None
            else f"{len(held.fulls)} full backup(s), "
            f"{sum(len(s) for s in held.segments.values())} segment(s)"
            + (f", {len(held.partial)} incomplete" if held.partial else "")
        )
        line = f"target {name}: {holds}; last replicated {entry.get('last_ok', 'never')}"
        if entry.get("last_failure") and entry["last_failure"] >= entry.get("last_ok", ""):
            line += (
                f"; LAST REPLICATION FAILED at {entry['last_failure']} "
                f"({entry.get('failures', 0)} failure(s) in all): {entry.get('last_error')}"
            )
        click.echo(line)


def _echo_windows(windows: list[archive.Window]) -> None:
    """The moments ``backup restore --at`` can restore (full backups plus the archive)."""
    if not windows:
        click.echo(
            "restorable window: none (point-in-time restore needs a full backup taken while "
            "`taskmanager archiver` runs)"
        )
        return
    for w in windows:
        click.echo(
            f"restorable window: {w.start.isoformat(timespec='seconds')} to "
            f"{w.end.isoformat(timespec='seconds')} (full backup {w.backup}, archive chain "
            f"{w.chain})"
        )


def _backup_table(rows: list[dict[str, Any]]) -> None:
    echo_table(
        ["ID", "STATUS", "STARTED", "SIZE", "DOCUMENTS", "COLLECTIONS", "ON DISK", "TARGETS"],
        [
            [
                str(r["id"]),
                str(r["status"]),
                str(r["started_at"] or "-")[:19],
                _size(r["size"]),
                "-" if r["documents"] is None else str(r["documents"]),
                "-" if r["collections"] is None else str(r["collections"]),
                str(r["on_disk"]),
                ",".join(r["targets"]) or "-",
            ]
            for r in rows
        ],
    )


def _row(
    backup_id: str, record: backups.BackupPublic | None, found: backups.OnDisk | None
) -> dict[str, Any]:
    """One line of ``backup list``: the catalogue's record, else what the manifest says."""
    on_disk = "absent" if found is None else "complete" if found.complete else "incomplete"
    if record is not None:
        started = record.started_at.isoformat(timespec="seconds") if record.started_at else None
        return {
            "id": backup_id,
            "status": record.status,
            "started_at": started,
            "size": record.size,
            "documents": record.documents,
            "collections": len(record.collections) if record.collections else None,
            "on_disk": on_disk,
        }
    manifest = found.manifest if found is not None else None
    return {
        "id": backup_id,
        "status": "not catalogued",
        "started_at": manifest["started_at"][:19] if manifest else None,
        "size": manifest["bytes"] if manifest else None,
        "documents": manifest["documents"] if manifest else None,
        "collections": len(manifest["collections"]) if manifest else None,
        "on_disk": on_disk,
    }


@contextmanager
def fetched(
    settings: Settings,
    source: str | None,
    *,
    backup_id: str | None = None,
    at: datetime | None = None,
) -> Iterator[Settings]:
    """``settings`` as they are without ``source``; else with ``BACKUP_DIR`` a temporary
    folder (0700, removed afterwards) holding what a restore of ``backup_id`` (or to ``at``)
    needs, downloaded from the target ``source`` (``primary``, ``offsite``, ``local`` or a
    target URL). Checking it is left to the restore or verify that follows."""
    if source is None:
        yield settings
        return
    try:
        target = backup_targets.find_target(settings, source)
    except backup_targets.TargetError as exc:
        raise click.ClickException(str(exc)) from exc
    with tempfile.TemporaryDirectory(prefix="taskmanager-restore-") as tmp:
        click.echo(f"downloading from target {target.name} ({target.describe()})", err=True)
        try:
            if backup_id is not None:
                backup_replication.fetch_backup(target, backup_id, Path(tmp))
            elif at is not None:
                backup_replication.fetch_for_moment(target, at, Path(tmp))
        except backup_targets.TargetError as exc:
            raise click.ClickException(str(exc)) from exc
        except Exception as exc:  # boto3's errors, OSError: the target did not answer
            raise click.ClickException(
                f"target {target.name} ({target.describe()}): {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            target.close()
        yield settings.model_copy(update={"backup_dir": tmp})


_FROM_HELP = (
    "Read the backup from this target (primary, offsite, or a target URL) instead of "
    "BACKUP_DIR: it is downloaded into a temporary folder first."
)


def _at_moment(at: str) -> datetime:
    try:
        return archive.parse_moment(at)
    except ValueError as exc:
        raise click.BadParameter(f"{at!r} is not an ISO 8601 moment", param_hint="--at") from exc


@backup.command("verify")
@click.argument("backup_id", metavar="[ID]", required=False)
@click.option(
    "--at", "at", default=None, help="Check what a restore to this moment (ISO 8601) would use."
)
@click.option("--from", "source", default=None, help=_FROM_HELP)
def backup_verify(backup_id: str | None, at: str | None, source: str | None) -> None:
    """Check a backup's files against its manifest, or (--at) the full backup and every archive
    segment a restore to that moment needs (exit 1 on any problem)."""
    if at is not None:
        from cli.archive import verify_at

        if backup_id is not None:
            raise click.UsageError("give a backup ID or --at, not both")
        base = load_settings_for_files()
        with fetched(base, source, at=_at_moment(at)) as settings:
            verify_at(at, settings)
        return
    if backup_id is None:
        raise click.UsageError("give a backup ID or --at")
    with ExitStack() as stack:
        base = load_settings_for_files()
        settings = stack.enter_context(fetched(base, source, backup_id=backup_id))
        _verify_id(settings, backup_id)


def _verify_id(settings: Settings, backup_id: str) -> None:
    try:
        path = backup_format.locate(settings, backup_id)
    except AppError as exc:
        raise click.ClickException(exc.detail) from exc
    with _bars("verify") as progress:
        report = restore.verify(path, progress)
    problems = report.problems
    if problems:
        for problem in problems:
            click.echo(f"problem: {problem}", err=True)
        click.echo(f"backup {backup_id}: {len(problems)} problem(s)")
        sys.exit(1)
    click.echo(
        f"backup {backup_id}: ok ({sum(report.collections.values())} documents in "
        f"{len(report.collections)} collections)"
    )


@backup.command("restore")
@click.argument("backup_id", metavar="[ID]", required=False)
@click.option(
    "--drop",
    is_flag=True,
    help="Drop every collection of the target database first (needed when it holds data).",
)
@click.option("--database", default=None, help="Restore into this database (default MONGODB_DB).")
@click.option("--at", "at", default=None, help="Point in time (ISO 8601) instead of an ID.")
@click.option("--into", default=None, help="With --at: the target database (default MONGODB_DB).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--from", "source", default=None, help=_FROM_HELP)
def backup_restore(
    backup_id: str | None,
    drop: bool,
    database: str | None,
    at: str | None,
    into: str | None,
    yes: bool,
    source: str | None,
) -> None:
    """Restore a backup (ID) or the database as it was at a moment (--at, from a full backup
    and the archive), from BACKUP_DIR or (--from) a remote target; stop web, workers,
    scheduler and archiver first."""
    if at is not None:
        from cli.archive import restore_at

        if backup_id is not None:
            raise click.UsageError("give a backup ID or --at, not both")
        with fetched(_settings(), source, at=_at_moment(at)) as settings:
            restore_at(at, into or database, drop, yes, settings)
        return
    if backup_id is None:
        raise click.UsageError("give a backup ID or --at")
    with fetched(_settings(), source, backup_id=backup_id) as settings:
        _restore_id(settings, backup_id, drop, database, yes)


def _restore_id(
    settings: Settings, backup_id: str, drop: bool, database: str | None, yes: bool
) -> None:
    target = database or settings.mongodb_db
    try:
        path = backup_format.locate(settings, backup_id)
    except AppError as exc:
        raise click.ClickException(exc.detail) from exc
    manifest = backup_format.read_manifest(path)
    if manifest is None:
        raise click.ClickException(f"backup {backup_id} has no manifest in {path}: not restorable")

    async def state(ctx: Context) -> dict[str, int]:
        return await restore.occupied(ctx, target)

    present = _run(settings, state)
    if present and not drop:
        listed = ", ".join(f"{n} ({c})" for n, c in sorted(present.items()))
        raise click.ClickException(
            f"database {target!r} holds data: {listed}. Refusing to mix two states: "
            "add --drop to replace it (or --database to restore elsewhere)"
        )
    click.echo(
        f"restore backup {backup_id} ({manifest['documents']} documents, taken "
        f"{manifest['started_at'][:19]}) into database {target!r}",
        err=True,
    )
    if present:
        click.echo(
            f"WARNING: --drop DELETES {sum(present.values())} documents in {len(present)} "
            f"collections of {target!r}: {', '.join(sorted(present))}",
            err=True,
        )
    if not yes:
        click.confirm("Proceed?", abort=True, err=True)

    async def work(ctx: Context) -> restore.RestoreResult:
        with _bars("verify") as verifying, _bars("restore") as progress:
            return await restore.restore(
                ctx,
                backup_id,
                drop=drop,
                database=database,
                progress=progress,
                verify_progress=verifying,
            )

    result = _run(settings, work)
    click.echo(
        f"restored {result.documents} documents into {len(result.collections)} collections "
        f"of {result.database!r} in {result.seconds:.1f} s ({result.docs_per_second:.0f} docs/s); "
        f"{result.indexes} indexes"
    )
    for conflict in result.index_conflicts:
        click.echo(f"index not restored: {conflict}", err=True)
