"""``taskmanager backup create|list|verify|restore``: full backups from the operator's shell.

``create`` takes the backup in this process (the scheduled and HTTP-requested ones run on a
worker); every command reads ``BACKUP_DIR`` from the environment like the other processes.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click

from cli.common import echo_table, load_settings, run_async
from config.connections import Connections
from config.logging import setup_logging
from config.settings import Settings
from core import archive, backup_format, backups, restore
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
    rows = [
        _row(backup_id, records.get(backup_id), disk.get(backup_id))
        for backup_id in sorted(set(records) | set(disk), reverse=True)[:limit]
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    windows = archive.windows(settings)
    if not rows:
        click.echo(f"no backups (BACKUP_DIR={settings.backup_dir})")
    else:
        _backup_table(rows)
    _echo_windows(windows)


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
        ["ID", "STATUS", "STARTED", "SIZE", "DOCUMENTS", "COLLECTIONS", "ON DISK"],
        [
            [
                str(r["id"]),
                str(r["status"]),
                str(r["started_at"] or "-")[:19],
                _size(r["size"]),
                "-" if r["documents"] is None else str(r["documents"]),
                "-" if r["collections"] is None else str(r["collections"]),
                str(r["on_disk"]),
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


@backup.command("verify")
@click.argument("backup_id", metavar="[ID]", required=False)
@click.option(
    "--at", "at", default=None, help="Check what a restore to this moment (ISO 8601) would use."
)
def backup_verify(backup_id: str | None, at: str | None) -> None:
    """Check a backup's files against its manifest, or (--at) the full backup and every archive
    segment a restore to that moment needs (exit 1 on any problem)."""
    if at is not None:
        from cli.archive import verify_at

        if backup_id is not None:
            raise click.UsageError("give a backup ID or --at, not both")
        verify_at(at)
        return
    if backup_id is None:
        raise click.UsageError("give a backup ID or --at")
    settings = load_settings_for_files()
    try:
        path = backup_format.locate(settings, backup_id)
    except AppError as exc:
        raise click.ClickException(exc.detail) from exc
    with _bars("verify") as progress:
        report = restore.verify(path, progress)
    if not report.ok:
        for problem in report.problems:
            click.echo(f"problem: {problem}", err=True)
        click.echo(f"backup {backup_id}: {len(report.problems)} problem(s)")
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
def backup_restore(
    backup_id: str | None,
    drop: bool,
    database: str | None,
    at: str | None,
    into: str | None,
    yes: bool,
) -> None:
    """Restore a backup (ID) or the database as it was at a moment (--at, from a full backup
    and the archive); stop web, workers, scheduler and archiver first."""
    if at is not None:
        from cli.archive import restore_at

        if backup_id is not None:
            raise click.UsageError("give a backup ID or --at, not both")
        restore_at(at, into or database, drop, yes)
        return
    if backup_id is None:
        raise click.UsageError("give a backup ID or --at")
    settings = _settings()
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
