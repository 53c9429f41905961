"""Copying ``BACKUP_DIR`` to the remote backup targets, retention on every target, and
fetching from a target for a restore (the targets themselves: :mod:`core.backup_targets`).

**Replication** (:func:`replicate`) brings each remote target up to date: after every
successful full backup (in the process that took it: a worker, the CLI, the archiver healing a
gap), and after every archive segment (by the archiver, in the background, so a slow or absent
target never holds the archive back). ``taskmanager backup replicate`` does it by hand.

**Visibility.** A full backup spans several objects: its files go first and ``manifest.json``
last, so a reader that sees a manifest sees every file it names, and a backup whose upload was
cut off is not listed (:attr:`Holdings.fulls`); the next replication finishes it. Segments are
single objects, uploaded in order. Deleting a full backup removes its manifest first.

**Retention** (:func:`plan_retention`), per target: the newest ``keep`` complete full backups
(``?keep=N`` in the target's URL, else ``BACKUP_KEEP``) and every segment a restore to a moment
of their windows needs: of the chain holding the oldest kept backup, its segments from
:data:`core.backup_format.REPLAY_MARGIN` seconds before that backup's first read on (and always
the chain's last segment, which the archiver resumes from), and every later chain whole. Older
chains and segments go. When no kept backup records cluster times, no segment is deleted.

**Failures** of a remote target (unreachable, refused, full) are logged
(``backup.replication_failed``), counted (``taskmanager_backup_replication_failures_total``)
and recorded in ``BACKUP_DIR/targets.json``, which ``taskmanager backup list`` shows; they never
fail the backup or the segment that was written locally. Every call is retried by botocore
(``standard`` mode); whatever is still missing is caught up by the next replication.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from config.logging import get_logger
from config.settings import Settings
from core import backup_metadata
from core.backup_format import (
    DIR_MODE,
    ID_RE,
    MANIFEST,
    REPLAY_MARGIN,
    member,
    read_manifest,
    write_json_atomically,
)
from core.backup_targets import Target, TargetError, local_target, remote_targets

log = get_logger(__name__)

ARCHIVE = "archive"
#: Per remote target: when it was last brought up to date, its last failure and their count.
STATUS_FILE = "targets.json"
#: The same pattern as :data:`core.archive.SEGMENT_RE` (not imported: core.archive imports us).
_SEGMENT = r"(\d{8})_(\d{1,12})\.(\d{1,10})_(\d{1,12})\.(\d{1,10})\.jsonl\.gz"
_SEGMENT_KEY = re.compile(rf"{ARCHIVE}/([^/]+)/{_SEGMENT}")

#: Failures per target in this process (the archiver's metrics endpoint exports them).
failures: dict[str, int] = {}
_counter: Counter | None = None
_counter_lock = threading.Lock()


def _failed(target: str) -> None:
    """Count a failed replication: here, and in ``taskmanager_backup_replication_failures``
    of the default registry (made at the first failure, so that in a Dramatiq worker process
    it is made after the switch to multiprocess mode and reaches the group's endpoint)."""
    global _counter
    with _counter_lock:
        failures[target] = failures.get(target, 0) + 1
        if _counter is None:
            _counter = Counter(
                "taskmanager_backup_replication_failures",
                "Replications of BACKUP_DIR to a remote backup target that failed",
                ["target"],
            )
        counter = _counter
    counter.labels(target=target).inc()


# -- What a target holds ---------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """An archive segment as a target names it."""

    key: str
    chain: str
    seq: int
    start: tuple[int, int]
    end: tuple[int, int]


@dataclass
class Holdings:
    """The backups and segments found among a target's keys."""

    sizes: dict[str, int]
    #: Full backups whose manifest is there (complete: every file was stored before it).
    fulls: set[str] = field(default_factory=set)
    #: Backups with files but no manifest (an upload cut off, or a delete half done).
    partial: set[str] = field(default_factory=set)
    segments: dict[str, list[Segment]] = field(default_factory=dict)

    def keys_of(self, backup_id: str) -> list[str]:
        """The keys of one backup, its manifest first."""
        own = [k for k in self.sizes if k.startswith(backup_id + "/")]
        return sorted(own, key=lambda k: (k != f"{backup_id}/{MANIFEST}", k))


def holdings(sizes: dict[str, int]) -> Holdings:
    """Sort a target's keys into full backups (complete or not) and segments."""
    found = Holdings(sizes)
    for key in sizes:
        head, _, rest = key.partition("/")
        if ID_RE.fullmatch(head) and rest and "/" not in rest:
            if rest == MANIFEST:
                found.fulls.add(head)
            else:
                found.partial.add(head)
            continue
        m = _SEGMENT_KEY.fullmatch(key)
        if m and ID_RE.fullmatch(m.group(1)):
            a, b, c, d, e = (int(g) for g in m.groups()[1:])
            seg = Segment(key, m.group(1), a, (b, c), (d, e))
            found.segments.setdefault(m.group(1), []).append(seg)
    found.partial -= found.fulls
    for segs in found.segments.values():
        segs.sort(key=lambda s: s.seq)
    return found


# -- Retention -------------------------------------------------------------------------------


@dataclass
class Retention:
    """What a target keeps and what it may delete."""

    kept: list[str]
    fulls: list[str]
    partial: list[str]
    segments: list[Segment]


def plan_retention(
    held: Holdings, keep: int, start_of: Callable[[str], tuple[int, int] | None]
) -> Retention:
    """The newest ``keep`` complete full backups are kept, and the segments their restorable
    windows need (module docstring); ``start_of(id)``: the cluster time at which a backup's
    reads began (``None``: it records none)."""
    ordered = sorted(held.fulls, reverse=True)
    kept, old = ordered[:keep], ordered[keep:]
    oldest = kept[-1] if kept else None
    partial = sorted(b for b in held.partial if oldest is not None and b < oldest)
    doomed: list[Segment] = []
    # The earliest first read of the kept backups (ids sort by the second only: within one
    # second, the one named first need not have started first).
    starts = [s for s in map(start_of, kept) if s is not None]
    start = min(starts) if starts else None
    if start is not None:
        chains = sorted(c for c, segs in held.segments.items() if segs)
        holding = [c for c in chains if held.segments[c][0].start <= start]
        if holding:
            chain = holding[-1]
            for older in chains[: chains.index(chain)]:
                doomed += held.segments[older]
            replay_from = (start[0] - REPLAY_MARGIN, 0)
            doomed += [s for s in held.segments[chain][:-1] if s.end < replay_from]
    return Retention(kept, old, partial, doomed)


def _cluster_start(manifest: dict[str, Any] | None) -> tuple[int, int] | None:
    ct = (manifest or {}).get("cluster_time")
    if not isinstance(ct, dict):
        return None
    try:
        return (int(ct["start"][0]), int(ct["start"][1]))
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def remote_manifest(target: Target, backup_id: str) -> dict[str, Any] | None:
    """A backup's manifest as a target holds it (``None``: absent)."""
    with tempfile.TemporaryDirectory(prefix="tm-manifest-") as tmp:
        dest = Path(tmp) / MANIFEST
        try:
            target.get(f"{backup_id}/{MANIFEST}", dest)
        except FileNotFoundError:
            return None
        data: dict[str, Any] = json.loads(dest.read_text())
        return data


def _delete_backups(target: Target, held: Holdings, ids: Iterable[str]) -> None:
    """Delete backups: their manifests first, in a call of their own (one DeleteObjects call
    deletes in no promised order), so none is ever listed with files missing."""
    ids = list(ids)
    target.delete(f"{b}/{MANIFEST}" for b in ids if b in held.fulls)
    target.delete(k for b in ids for k in held.keys_of(b) if not k.endswith("/" + MANIFEST))


def prune_local_segments(settings: Settings, keep: int | None = None) -> list[str]:
    """Delete the archive segments in ``BACKUP_DIR`` that no kept full backup needs (blocking;
    full backups themselves are pruned by :func:`core.backups.prune`). Returns their keys."""
    local = local_target(settings)
    held = holdings(local.keys())
    root = Path(settings.backup_dir)
    plan = plan_retention(
        held, keep or settings.backup_keep, lambda i: _cluster_start(read_manifest(root / i))
    )
    doomed = [s.key for s in plan.segments]
    local.delete(doomed)
    if doomed:
        log.info("archive.segments_pruned", count=len(doomed), first=doomed[0], last=doomed[-1])
    return doomed


# -- Replication -----------------------------------------------------------------------------


@dataclass
class SyncReport:
    """One replication of ``BACKUP_DIR`` to one remote target."""

    target: str
    where: str
    ok: bool
    uploaded_fulls: list[str] = field(default_factory=list)
    uploaded_segments: int = 0
    bytes: int = 0
    deleted_fulls: list[str] = field(default_factory=list)
    deleted_segments: int = 0
    error: str | None = None
    seconds: float = 0.0


def sync(settings: Settings, target: Target) -> SyncReport:
    """Bring ``target`` up to date with ``BACKUP_DIR`` and apply its retention (blocking).

    Uploads the complete full backups it lacks among the newest ``keep`` (files first, the
    manifest last), then the segments it lacks that those backups need (in order), then deletes
    what its retention no longer keeps.
    """
    started = time.monotonic()
    root = Path(settings.backup_dir)
    keep = target.keep or settings.backup_keep
    report = SyncReport(target.name, target.describe(), ok=True)
    local = holdings(local_target(settings).keys())
    remote = holdings(target.keys())
    union = Holdings({**remote.sizes, **local.sizes}, local.fulls | remote.fulls)
    for chain in set(local.segments) | set(remote.segments):
        both = [*remote.segments.get(chain, []), *local.segments.get(chain, [])]
        merged = {s.seq: s for s in both}
        union.segments[chain] = sorted(merged.values(), key=lambda s: s.seq)
    manifests: dict[str, dict[str, Any] | None] = {}

    def start_of(backup_id: str) -> tuple[int, int] | None:
        if backup_id not in manifests:
            local_one = read_manifest(root / backup_id) if backup_id in local.fulls else None
            manifests[backup_id] = local_one or remote_manifest(target, backup_id)
        return _cluster_start(manifests[backup_id])

    plan = plan_retention(union, keep, start_of)
    for backup_id in sorted(set(plan.kept) & (local.fulls - remote.fulls)):
        report.bytes += _upload_backup(target, root / backup_id, remote.sizes)
        report.uploaded_fulls.append(backup_id)
    doomed = {s.key for s in plan.segments}
    for chain in sorted(local.segments):
        for seg in local.segments[chain]:
            if seg.key in doomed or remote.sizes.get(seg.key) == local.sizes[seg.key]:
                continue
            target.put(seg.key, root / seg.key)
            report.uploaded_segments += 1
            report.bytes += local.sizes[seg.key]
    after = holdings(target.keys())
    oldest = plan.kept[-1] if plan.kept else None
    leftovers = [b for b in after.partial if oldest is not None and b < oldest]
    gone = [b for b in {*plan.fulls, *leftovers} if b in after.fulls | after.partial]
    _delete_backups(target, after, gone)
    report.deleted_fulls = [b for b in plan.fulls if b in gone]
    stale = [s.key for s in plan.segments if s.key in after.sizes]
    target.delete(stale)
    report.deleted_segments = len(stale)
    report.seconds = time.monotonic() - started
    return report


def _upload_backup(target: Target, path: Path, present: dict[str, int]) -> int:
    """Upload one complete local backup, every file its manifest names, then the manifest."""
    manifest = read_manifest(path)
    if manifest is None:
        raise TargetError(f"backup {path.name} has no manifest: not uploaded")
    sent = 0
    for entry in manifest.get("collections", {}).values():
        # The documents, and mongodump's metadata file beside them (core.backup_metadata).
        for file in (member(path, entry.get("file")), *backup_metadata.files(path, entry)):
            key = f"{path.name}/{file.name}"
            size = file.stat().st_size
            if present.get(key) != size:
                target.put(key, file)
                sent += size
    target.put(f"{path.name}/{MANIFEST}", path / MANIFEST)
    return sent + (path / MANIFEST).stat().st_size


def replicate(settings: Settings, only: Iterable[str] | None = None) -> list[SyncReport]:
    """Sync ``BACKUP_DIR`` to every remote target (blocking), one after the other; a failing
    target is logged, counted and recorded, and the others are still synced. Never raises for
    a target's failure."""
    wanted = set(only) if only is not None else None
    reports: list[SyncReport] = []
    try:
        targets = remote_targets(settings)
    except TargetError as exc:
        _failed("config")
        log.error("backup.replication_failed", target="config", error=str(exc))
        return [SyncReport("config", "-", ok=False, error=str(exc))]
    for target in targets:
        if wanted is not None and target.name not in wanted:
            continue
        started = time.monotonic()
        try:
            report = sync(settings, target)
        except Exception as exc:
            # boto3's ClientError/BotoCoreError, OSError, a damaged manifest: the message only
            # (botocore's messages never carry the credentials).
            report = SyncReport(
                target.name,
                target.describe(),
                ok=False,
                error=f"{type(exc).__name__}: {exc}"[:500],
                seconds=time.monotonic() - started,
            )
            _failed(target.name)
            log.error(
                "backup.replication_failed",
                target=target.name,
                where=report.where,
                error=report.error,
            )
        else:
            log.info(
                "backup.replicated",
                target=target.name,
                where=report.where,
                uploaded_fulls=report.uploaded_fulls,
                uploaded_segments=report.uploaded_segments,
                bytes=report.bytes,
                deleted_fulls=report.deleted_fulls,
                deleted_segments=report.deleted_segments,
                seconds=round(report.seconds, 2),
            )
        finally:
            target.close()
        _record(settings, report)
        reports.append(report)
    return reports


def _record(settings: Settings, report: SyncReport) -> None:
    root = Path(settings.backup_dir)
    if not root.is_dir():
        return
    status = read_status(settings)
    entry = status.setdefault(report.target, {"failures": 0})
    entry["where"] = report.where
    now = datetime.now(UTC).isoformat(timespec="seconds")
    if report.ok:
        entry["last_ok"] = now
    else:
        entry["last_failure"] = now
        entry["last_error"] = report.error
        entry["failures"] = int(entry.get("failures", 0)) + 1
    with contextlib.suppress(OSError):
        write_json_atomically(root / STATUS_FILE, status)


def read_status(settings: Settings) -> dict[str, dict[str, Any]]:
    """``BACKUP_DIR/targets.json``: per remote target, ``last_ok``, ``last_failure``,
    ``last_error`` and ``failures`` (empty when nothing was replicated yet)."""
    try:
        data: dict[str, dict[str, Any]] = json.loads(
            (Path(settings.backup_dir) / STATUS_FILE).read_text()
        )
    except (OSError, ValueError):
        return {}
    return data


# -- Fetching from a target (restore from a copy) ---------------------------------------------


def fetch_backup(target: Target, backup_id: str, dest: Path) -> Path:
    """Download one complete full backup into ``dest/<id>/`` (a ``BACKUP_DIR`` layout): its
    manifest, then every file it names. :class:`TargetError` when the target holds none."""
    if not ID_RE.fullmatch(backup_id):
        raise TargetError(f"{backup_id!r} is not a backup id")
    folder = dest / backup_id
    folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    try:
        target.get(f"{backup_id}/{MANIFEST}", folder / MANIFEST)
    except FileNotFoundError as exc:
        (folder / MANIFEST).unlink(missing_ok=True)
        raise TargetError(
            f"target {target.name} ({target.describe()}) holds no complete backup {backup_id}"
        ) from exc
    manifest = read_manifest(folder)
    for entry in (manifest or {}).get("collections", {}).values():
        try:
            named = [member(folder, entry.get("file")), *backup_metadata.files(folder, entry)]
        except (ValueError, AttributeError):
            continue  # verify names it when the restore checks the backup
        for file in named:
            with contextlib.suppress(FileNotFoundError):  # verify reports it missing
                target.get(f"{backup_id}/{file.name}", file)
    return folder


def fetch_for_moment(target: Target, at: datetime, dest: Path, slack: int = 300) -> None:
    """Download into ``dest`` (a ``BACKUP_DIR`` layout) what a restore to ``at`` needs from
    ``target``: the newest full backup restorable before ``at`` and the segments of its chain
    from just before its first read to a little after ``at``. Choosing and checking is left to
    :func:`core.archive.plan` on ``dest``, which refuses with the usual messages."""
    held = holdings(target.keys())
    candidates: list[tuple[tuple[int, int], str, tuple[int, int]]] = []
    for backup_id in sorted(held.fulls):
        folder = dest / backup_id
        folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        target.get(f"{backup_id}/{MANIFEST}", folder / MANIFEST)
        manifest = read_manifest(folder) or {}
        ct = manifest.get("cluster_time")
        start = _cluster_start(manifest)
        if start is None or not isinstance(ct, dict):
            continue
        consistent = (int(ct["consistent"][0]), int(ct["consistent"][1]))
        if consistent[0] + 1 <= at.timestamp():
            candidates.append((consistent, backup_id, start))
    if not candidates:
        return  # every manifest is there: plan() names the oldest restorable moment
    _consistent, chosen, start = max(candidates)
    for backup_id in held.fulls - {chosen}:
        shutil.rmtree(dest / backup_id, ignore_errors=True)
    fetch_backup(target, chosen, dest)
    chains = sorted(c for c, segs in held.segments.items() if segs and segs[0].start <= start)
    if not chains:
        return
    replay_from = (start[0] - REPLAY_MARGIN, 0)
    for seg in held.segments[chains[-1]]:
        if seg.end >= replay_from and seg.start[0] <= at.timestamp() + slack:
            folder = dest / ARCHIVE / seg.chain
            folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            target.get(seg.key, dest / seg.key)
