"""Full logical backups of the database: taking, listing, pruning, and their catalogue.

The format of a backup (a directory of gzip'd BSON files and a manifest) is described in
:mod:`core.backup_format`; verifying and restoring a backup is :mod:`core.restore`.

Consistency. Reads go through one snapshot session (MongoDB 5.0+ on a replica set: every
collection read at the same cluster time) when the server accepts it. When it does not, or when
a long backup outlives the server's snapshot history window (``SnapshotTooOld`` after
``minSnapshotHistoryWindowInSeconds``, 300 s by default), the remaining collections are read
plainly, each at its own moment; the manifest says which (``read`` per collection). That is
tolerable here: a write and its events land in one transaction (the outbox), events still
pending in a backup are relayed again after a restore, and every actor is idempotent. SecantusDB,
the test server, accepts snapshot sessions but does not isolate reads across collections.

The ``backups`` collection is the catalogue of backups (queued, running, succeeded, failed,
pruned) that ``/admin/backups`` shows. It describes files outside the database, so it is neither
backed up nor dropped or overwritten by a restore.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any, Literal, cast

from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from pydantic import BaseModel, Field
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import OperationFailure

from config.logging import get_logger
from config.settings import Settings
from core import backup_metadata, backup_replication
from core.backup_format import (
    BATCH,
    COLLECTION,
    DIR_MODE,
    FILE_MODE,
    FORMAT,
    ID_RE,
    MANIFEST,
    Progress,
    data_collections,
    locate,
    operation_time,
    read_manifest,
    to_json,
    write_json_atomically,
)
from core.backup_replication import SyncReport
from core.context import Context
from core.errors import Conflict, NotFound
from core.pagination import Page, PageQuery, keyset_page
from core.store import Doc, utcnow

log = get_logger(__name__)

#: A queued or running backup older than this no longer blocks a new request.
STALE_AFTER = timedelta(hours=2)

Status = Literal["queued", "running", "succeeded", "failed", "pruned"]

_RAW = CodecOptions(document_class=RawBSONDocument)


# -- Results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackupResult:
    """A finished backup."""

    id: str
    path: Path
    started_at: datetime
    finished_at: datetime
    collections: dict[str, int]
    documents: int
    size: int
    read_mode: Literal["snapshot", "plain"]
    pruned: list[str] = field(default_factory=list)
    #: One report per remote target (core.backup_replication): copied there, or why not.
    replicated: list[SyncReport] = field(default_factory=list)


@dataclass(frozen=True)
class OnDisk:
    """A backup directory as found in ``BACKUP_DIR``."""

    id: str
    path: Path
    complete: bool
    manifest: dict[str, Any] | None


# -- API shapes ------------------------------------------------------------------------------


class CollectionSummary(BaseModel):
    """One collection of a backup."""

    name: str
    documents: int
    bytes: int = Field(description="Size of its compressed file")


class BackupPublic(BaseModel):
    """A backup as the admin API shows it."""

    id: str
    status: Status
    manual: bool = Field(description="Requested by an operator rather than the schedule")
    requested_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    path: str | None = Field(description="The backup's directory on the worker")
    size: int | None = Field(description="Bytes on disk (compressed)")
    documents: int | None
    collections: list[CollectionSummary]
    read_mode: Literal["snapshot", "plain"] | None = Field(
        description="snapshot: every collection read at one point in time"
    )
    error: str | None


class BackupPage(Page[BackupPublic]):
    """A page of backups, newest first."""


def public(doc: Doc) -> BackupPublic:
    """The API view of a catalogue record."""
    return BackupPublic(
        id=doc["_id"],
        status=doc["status"],
        manual=bool(doc.get("manual")),
        requested_at=doc["requested_at"],
        started_at=doc.get("started_at"),
        finished_at=doc.get("finished_at"),
        path=doc.get("path"),
        size=doc.get("size"),
        documents=doc.get("documents"),
        collections=[CollectionSummary(**c) for c in doc.get("collections", [])],
        read_mode=doc.get("read_mode"),
        error=doc.get("error"),
    )


# -- Ids and places --------------------------------------------------------------------------


def new_id(now: datetime | None = None) -> str:
    """A fresh backup id: UTC time to the second, then 6 random hex digits."""
    return f"{(now or utcnow()):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def id_for_fire(fire_key: str, scheduled_for: datetime) -> str:
    """The backup id of a scheduled fire: the same for every delivery of its message, so a
    redelivered or retried run takes that backup again instead of starting another."""
    return f"{scheduled_for:%Y%m%dT%H%M%SZ}-{hashlib.sha256(fire_key.encode()).hexdigest()[:6]}"


def _file_name(collection: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", collection):
        return f"{collection}.bson.gz"
    return f"c-{hashlib.sha256(collection.encode()).hexdigest()[:16]}.bson.gz"


def scan(settings: Settings) -> list[OnDisk]:
    """Every backup directory in ``BACKUP_DIR``, newest first."""
    root = Path(settings.backup_dir)
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir(), key=lambda p: p.name, reverse=True):
        if path.is_dir() and ID_RE.fullmatch(path.name):
            try:
                manifest = read_manifest(path)
            except (OSError, ValueError):
                manifest = None
            found.append(OnDisk(path.name, path, manifest is not None, manifest))
    return found


# -- The catalogue ---------------------------------------------------------------------------


async def request(ctx: Context, *, manual: bool = True) -> Doc:
    """Record a backup about to be enqueued (``queued``), so it can be followed at once.

    One at a time: :class:`Conflict` while another is queued or running, unless that one was
    requested more than :data:`STALE_AFTER` ago (its worker died with it, say), so a lost run
    cannot block backups for good.
    """
    now = utcnow()
    busy = await ctx.store[COLLECTION].find_one(
        {"status": {"$in": ["queued", "running"]}, "requested_at": {"$gt": now - STALE_AFTER}}
    )
    if busy is not None:
        raise Conflict(f"Backup {busy['_id']} is {busy['status']}: one backup runs at a time")
    doc: Doc = {
        "_id": new_id(now),
        "status": "queued",
        "manual": manual,
        "requested_at": now,
        "collections": [],
    }
    await ctx.store[COLLECTION].insert_one(doc)
    return doc


async def enqueued(ctx: Context, backup_id: str, fire_key: str) -> None:
    """Note the message that runs a requested backup (its run claims the record by it)."""
    await ctx.store[COLLECTION].update_one({"_id": backup_id}, {"$set": {"fire_key": fire_key}})


async def not_enqueued(ctx: Context, backup_id: str) -> None:
    """Mark a requested backup ``failed``: its message could not be sent."""
    await ctx.store[COLLECTION].update_one(
        {"_id": backup_id},
        {"$set": {"status": "failed", "error": "The broker was unreachable: not enqueued"}},
    )


async def get(ctx: Context, backup_id: str) -> Doc:
    """The catalogue record of ``backup_id``; :class:`NotFound` when there is none."""
    locate(ctx.settings, backup_id)
    doc = await ctx.store[COLLECTION].find_one({"_id": backup_id})
    if doc is None:
        raise NotFound(f"No backup {backup_id!r}")
    return doc


async def page(ctx: Context, q: PageQuery) -> BackupPage:
    """Catalogue records, newest first (ids sort by time), keyset-paginated."""
    docs, cursor = await keyset_page(ctx, COLLECTION, {}, q, scope="backups")
    return BackupPage(items=[public(d) for d in docs], next_cursor=cursor)


async def _claim(ctx: Context, backup_id: str, fire_key: str | None, *, manual: bool) -> Doc | None:
    """Mark ``backup_id`` running (creating its record for a scheduled backup); ``None`` when it
    already succeeded (a redelivered message)."""
    coll = ctx.store[COLLECTION]
    done = await coll.find_one({"_id": backup_id, "status": "succeeded"})
    if done is not None:
        return None
    now = utcnow()
    await coll.update_one(
        {"_id": backup_id},
        {
            "$set": {"status": "running", "started_at": now, "error": None, "fire_key": fire_key},
            "$unset": {"finished_at": ""},
            "$setOnInsert": {"manual": manual, "requested_at": now, "collections": []},
            "$inc": {"attempts": 1},
        },
        upsert=True,
    )
    return await coll.find_one({"_id": backup_id})


# -- Taking a backup -------------------------------------------------------------------------


class _Sink:
    """A gzip'd file being written, hashed as it goes (the sha256 is of the file's bytes)."""

    def __init__(self, path: Path):
        # Owner-only (0600): a backup holds password hashes and emails.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        os.fchmod(fd, FILE_MODE)
        self.file: IO[bytes] = os.fdopen(fd, "wb")
        self.sha = hashlib.sha256()
        self.size = 0
        self.gz = gzip.GzipFile(fileobj=self, mode="wb", compresslevel=6, mtime=0)

    def write(self, data: bytes) -> int:
        # Called by GzipFile with compressed bytes.
        self.file.write(data)
        self.sha.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self.file.flush()

    def add(self, data: bytes) -> None:
        self.gz.write(data)

    def close(self) -> None:
        """Finish the gzip stream and make the file durable before a manifest may name it."""
        self.gz.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def abort(self) -> None:
        self.file.close()


async def _dump(
    coll: AsyncCollection[RawBSONDocument],
    session: AsyncClientSession | None,
    path: Path,
    expected: int,
    progress: Progress | None,
    batch_size: int,
) -> tuple[int, int, str]:
    """Stream one collection into ``path``; returns (documents, bytes, sha256)."""
    sink = await asyncio.to_thread(_Sink, path)
    done = 0
    try:
        chunk: list[bytes | memoryview] = []
        async for doc in coll.find({}, session=session, batch_size=batch_size):
            chunk.append(doc.raw)
            if len(chunk) >= batch_size:
                await asyncio.to_thread(sink.add, b"".join(chunk))
                done += len(chunk)
                chunk = []
                if progress is not None:
                    progress(coll.name, done, max(expected, done))
        if chunk:
            await asyncio.to_thread(sink.add, b"".join(chunk))
            done += len(chunk)
        if progress is not None:
            progress(coll.name, done, done)
        await asyncio.to_thread(sink.close)
    except BaseException:
        await asyncio.to_thread(sink.abort)
        raise
    return done, sink.size, sink.sha.hexdigest()


def _make_dir(path: Path) -> None:
    """``BACKUP_DIR`` (when it does not exist yet) and the backup's directory, owner-only."""
    path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    path.mkdir(mode=DIR_MODE)
    os.chmod(path, DIR_MODE)


async def create(
    ctx: Context,
    backup_id: str | None = None,
    *,
    fire_key: str | None = None,
    progress: Progress | None = None,
    batch_size: int = BATCH,
) -> BackupResult:
    """Take a full backup of the configured database into ``BACKUP_DIR/<id>/``.

    ``backup_id`` names a backup recorded by :func:`request` or a scheduled fire's
    (:func:`id_for_fire`); without one, a new id is made (an operator's ``backup create``).
    Running it again after a failure starts over; after a success it returns the finished
    backup. Older backups beyond ``BACKUP_KEEP`` are pruned once this one succeeded, then the
    remote targets are brought up to date (:func:`core.backup_replication.replicate`: a target
    that fails is reported in ``replicated``, never a failed backup).
    """
    path = locate(ctx.settings, backup_id or new_id())
    record = await _claim(ctx, path.name, fire_key, manual=backup_id is None)
    backup_id = path.name
    if record is None:
        return _finished(await get(ctx, backup_id))
    started: datetime = record["started_at"]
    log.info("backup.started", backup_id=backup_id, path=str(path))
    try:
        manifest = await _take(ctx, backup_id, path, started, progress, batch_size)
    except BaseException as exc:
        await asyncio.to_thread(shutil.rmtree, path, True)
        await ctx.store[COLLECTION].update_one(
            {"_id": backup_id},
            {"$set": {"status": "failed", "finished_at": utcnow(), "error": repr(exc)[:1000]}},
        )
        log.error("backup.failed", backup_id=backup_id, error=repr(exc))
        raise
    entries = manifest["collections"]
    summary = [
        {"name": name, "documents": e["documents"], "bytes": e["bytes"]}
        for name, e in entries.items()
    ]
    finished = datetime.fromisoformat(manifest["finished_at"])
    await ctx.store[COLLECTION].update_one(
        {"_id": backup_id},
        {
            "$set": {
                "status": "succeeded",
                "finished_at": finished,
                "path": str(path),
                "size": manifest["bytes"],
                "documents": manifest["documents"],
                "collections": summary,
                "read_mode": manifest["read_mode"],
            }
        },
    )
    pruned = await prune(ctx)
    # Copies on the remote targets: a failure there is logged, counted and shown by
    # `backup list`, never a failed backup (the local one is complete); the next replication
    # (the archiver's, the next backup's, `backup replicate`) catches up.
    replicated = await asyncio.to_thread(backup_replication.replicate, ctx.settings)
    log.info(
        "backup.succeeded",
        backup_id=backup_id,
        documents=manifest["documents"],
        bytes=manifest["bytes"],
        read_mode=manifest["read_mode"],
        pruned=pruned,
        replicated={r.target: r.ok for r in replicated},
    )
    return BackupResult(
        id=backup_id,
        path=path,
        started_at=started,
        finished_at=finished,
        collections={name: e["documents"] for name, e in entries.items()},
        documents=manifest["documents"],
        size=manifest["bytes"],
        read_mode=manifest["read_mode"],
        pruned=pruned,
        replicated=replicated,
    )


def _finished(doc: Doc) -> BackupResult:
    return BackupResult(
        id=doc["_id"],
        path=Path(doc["path"]),
        started_at=doc["started_at"],
        finished_at=doc["finished_at"],
        collections={c["name"]: c["documents"] for c in doc["collections"]},
        documents=doc["documents"],
        size=doc["size"],
        read_mode=doc["read_mode"],
    )


async def _take(
    ctx: Context,
    backup_id: str,
    path: Path,
    started: datetime,
    progress: Progress | None,
    batch_size: int,
) -> dict[str, Any]:
    """Write every collection, then the manifest; returns the manifest."""
    await asyncio.to_thread(shutil.rmtree, path, True)  # what a failed attempt left
    await asyncio.to_thread(_make_dir, path)
    db = ctx.store.db
    entries: dict[str, Any] = {}
    # Where the archive's change events must be replayed from (and up to, at least) for this
    # dump to become one consistent state: see core.archive.
    start_ct = await operation_time(db)
    async with ctx.store.client.start_session(snapshot=True) as snapshot:
        session: AsyncClientSession | None = snapshot
        for info in await data_collections(db):
            name = info["name"]
            coll = cast(
                "AsyncCollection[RawBSONDocument]", db.get_collection(name, codec_options=_RAW)
            )
            expected = await coll.estimated_document_count()
            target = path / _file_name(name)
            read = "plain"
            if session is not None:
                try:
                    documents, size, sha = await _dump(
                        coll, session, target, expected, progress, batch_size
                    )
                    read = "snapshot"
                except OperationFailure as exc:
                    # No snapshot reads on this server (standalone, or too old), or the
                    # snapshot's history window ran out: carry on with plain reads.
                    log.warning(
                        "backup.snapshot_unavailable",
                        collection=name,
                        code=exc.code,
                        error=str(exc),
                    )
                    session = None
            if read == "plain":
                documents, size, sha = await _dump(
                    coll, None, target, expected, progress, batch_size
                )
            specs = [spec async for spec in await db[name].list_indexes()]
            indexes = [
                {k: v for k, v in spec.items() if k not in ("v", "ns")}
                for spec in specs
                if spec["name"] != "_id_"
            ]
            entries[name] = {
                "file": target.name,
                "documents": documents,
                "bytes": size,
                "sha256": sha,
                "read": read,
                "options": to_json(info.get("options", {})),
                "indexes": to_json(indexes),
                # mongodump's <coll>.metadata.json.gz, for mongorestore (core.backup_metadata).
                "metadata": await asyncio.to_thread(
                    backup_metadata.write, path, target.name, name, info, specs
                ),
            }
    consistent_ct = await operation_time(db)
    reads = {e["read"] for e in entries.values()}
    manifest = {
        "format": FORMAT,
        "id": backup_id,
        "database": ctx.settings.mongodb_db,
        "status": "complete",
        "started_at": started.isoformat(),
        "finished_at": utcnow().isoformat(),
        "read_mode": "snapshot" if reads <= {"snapshot"} else "plain",
        "documents": sum(e["documents"] for e in entries.values()),
        "bytes": sum(e["bytes"] for e in entries.values()),
        "collections": entries,
    }
    if start_ct is not None and consistent_ct is not None:
        manifest["cluster_time"] = {
            "start": [start_ct.time, start_ct.inc],
            "consistent": [consistent_ct.time, consistent_ct.inc],
        }
    await asyncio.to_thread(write_json_atomically, path / MANIFEST, manifest)
    return manifest


# -- Retention -------------------------------------------------------------------------------


async def prune(ctx: Context, keep: int | None = None) -> list[str]:
    """Delete complete backups beyond the newest ``keep`` (``BACKUP_KEEP``), and leftovers of
    crashed attempts older than the oldest kept one; then the archive segments no kept backup
    needs (:func:`core.backup_replication.prune_local_segments`). Returns the backup ids removed."""
    keep = keep or ctx.settings.backup_keep
    try:
        return await _prune_fulls(ctx, keep)
    finally:
        await asyncio.to_thread(backup_replication.prune_local_segments, ctx.settings, keep)


async def _prune_fulls(ctx: Context, keep: int) -> list[str]:
    found = await asyncio.to_thread(scan, ctx.settings)
    complete = [b for b in found if b.complete]
    if len(complete) <= keep:
        return []
    oldest_kept = complete[keep - 1].id
    doomed = [b.id for b in complete[keep:]]
    leftovers = [b.id for b in found if not b.complete and b.id < oldest_kept]
    if leftovers:
        busy = ctx.store[COLLECTION].find(
            {"_id": {"$in": leftovers}, "status": {"$in": ["queued", "running"]}}, {"_id": 1}
        )
        in_flight = {d["_id"] async for d in busy}
        doomed += [i for i in leftovers if i not in in_flight]
    for backup_id in doomed:
        await asyncio.to_thread(shutil.rmtree, locate(ctx.settings, backup_id), True)
    await ctx.store[COLLECTION].update_many(
        {"_id": {"$in": doomed}},
        {"$set": {"status": "pruned", "pruned_at": utcnow()}},
    )
    return sorted(doomed)
