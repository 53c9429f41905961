"""Full logical backups of the database: taking, verifying, restoring, listing, pruning.

A backup is the directory ``BACKUP_DIR/<id>/`` (``id``: UTC time plus a short random part, so
names sort by age). It holds one gzip'd file per collection of length-prefixed BSON documents,
written exactly as the server sent them (``RawBSONDocument``: ObjectIds, datetimes, int32 versus
int64 and field order survive untouched), and ``manifest.json``, written last and atomically:
a directory without a manifest is an incomplete backup. The manifest names each collection's
file, document count, size and sha256, its options and its index definitions.

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
import base64
import contextlib
import gzip
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any, Literal, Protocol, cast

import bson
from bson import json_util
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.errors import BSONError
from bson.raw_bson import RawBSONDocument
from pydantic import BaseModel, Field
from pymongo import DESCENDING
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import CollectionInvalid, OperationFailure
from redis.exceptions import RedisError

from config.logging import get_logger
from config.settings import Settings
from core.context import Context
from core.errors import Conflict, FieldError, Invalid, NotFound
from core.store import Doc, Store, utcnow

log = get_logger(__name__)

COLLECTION = "backups"
#: Collections never backed up nor touched by a restore (see the module docstring).
SKIP = frozenset({COLLECTION})
MANIFEST = "manifest.json"
FORMAT = 1
ID_RE = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{6}")
BATCH = 1000
#: A queued or running backup older than this no longer blocks a new request.
STALE_AFTER = timedelta(hours=2)

Status = Literal["queued", "running", "succeeded", "failed", "pruned"]
#: ``progress(collection, documents done, documents expected)``; called after every batch.
Progress = Callable[[str, int, int], None]

_RAW = CodecOptions(document_class=RawBSONDocument)
#: Verification decodes every value; a date outside Python's range is still valid BSON.
_DECODE: CodecOptions[dict[str, Any]] = CodecOptions(
    datetime_conversion=DatetimeConversion.DATETIME_AUTO
)
_RELAXED = json_util.JSONOptions(json_mode=json_util.JSONMode.RELAXED, tz_aware=True)


class CorruptBackup(Invalid):
    """A backup whose files do not match its manifest (or that has none)."""

    def __init__(self, backup_id: str, problems: list[str]):
        super().__init__(
            f"Backup {backup_id} failed verification: " + "; ".join(problems[:5]),
            [FieldError(field="backup", message=p) for p in problems],
        )
        self.problems = problems


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


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify` found: ``ok`` when every file matches the manifest."""

    id: str
    path: Path
    problems: list[str]
    collections: dict[str, int]

    @property
    def ok(self) -> bool:
        """No problem found."""
        return not self.problems


@dataclass(frozen=True)
class RestoreResult:
    """A finished restore."""

    id: str
    database: str
    collections: dict[str, int]
    documents: int
    dropped: list[str]
    indexes: int
    index_conflicts: list[str]
    seconds: float

    @property
    def docs_per_second(self) -> float:
        """Restore throughput (verification excluded)."""
        return self.documents / self.seconds if self.seconds > 0 else 0.0


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


class BackupPage(BaseModel):
    """A page of backups, newest first."""

    items: list[BackupPublic]
    next_cursor: str | None


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


def locate(settings: Settings, backup_id: str) -> Path:
    """The directory of ``backup_id`` (which need not exist); :class:`NotFound` for anything
    that is not a backup id, so no path outside ``BACKUP_DIR`` can ever be named."""
    if not ID_RE.fullmatch(backup_id):
        raise NotFound(f"No backup {backup_id!r}")
    return Path(settings.backup_dir) / backup_id


def _file_name(collection: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", collection):
        return f"{collection}.bson.gz"
    return f"c-{hashlib.sha256(collection.encode()).hexdigest()[:16]}.bson.gz"


def _to_json(value: Any) -> Any:
    return json.loads(json_util.dumps(value, json_options=_RELAXED))


def _from_json(value: Any) -> Any:
    return json_util.loads(json.dumps(value), json_options=_RELAXED)


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest of the backup in ``path``; ``None`` when absent (an incomplete backup)."""
    try:
        data: dict[str, Any] = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    return data


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


async def get(ctx: Context, backup_id: str) -> Doc:
    """The catalogue record of ``backup_id``; :class:`NotFound` when there is none."""
    locate(ctx.settings, backup_id)
    doc = await ctx.store[COLLECTION].find_one({"_id": backup_id})
    if doc is None:
        raise NotFound(f"No backup {backup_id!r}")
    return doc


async def page(ctx: Context, limit: int = 50, cursor: str | None = None) -> BackupPage:
    """Catalogue records, newest first (ids sort by time), keyset-paginated."""
    query: Doc = {}
    if cursor is not None:
        query = {"_id": {"$lt": _decode_cursor(cursor)}}
    docs = await (
        ctx.store[COLLECTION].find(query).sort("_id", DESCENDING).limit(limit + 1).to_list()
    )
    more = len(docs) > limit
    docs = docs[:limit]
    next_cursor = _encode_cursor(docs[-1]["_id"]) if more else None
    return BackupPage(items=[public(d) for d in docs], next_cursor=next_cursor)


def _encode_cursor(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode()).rstrip(b"=").decode()


def _decode_cursor(cursor: str) -> str:
    try:
        value = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        value = ""
    if not ID_RE.fullmatch(value):
        raise Invalid(
            "The cursor is not valid", [FieldError("query.cursor", "Invalid or expired cursor")]
        )
    return value


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
        self.file: IO[bytes] = open(path, "wb")  # noqa: SIM115  (closed by close())
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


async def _collections(db: AsyncDatabase[Doc]) -> list[Doc]:
    """The collections holding data (no views, no system collections, nothing in SKIP)."""
    infos = [dict(info) async for info in await db.list_collections()]
    return sorted(
        (
            i
            for i in infos
            if i.get("type", "collection") == "collection"
            and not i["name"].startswith("system.")
            and i["name"] not in SKIP
        ),
        key=lambda i: str(i["name"]),
    )


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


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    tmp = path / (MANIFEST + ".tmp")
    with open(tmp, "w") as out:
        json.dump(manifest, out, indent=2)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path / MANIFEST)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself must survive a crash
    finally:
        os.close(fd)


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
    backup. Older backups beyond ``BACKUP_KEEP`` are pruned once this one succeeded.
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
    log.info(
        "backup.succeeded",
        backup_id=backup_id,
        documents=manifest["documents"],
        bytes=manifest["bytes"],
        read_mode=manifest["read_mode"],
        pruned=pruned,
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
    await asyncio.to_thread(path.mkdir, parents=True)
    db = ctx.store.db
    entries: dict[str, Any] = {}
    async with ctx.store.client.start_session(snapshot=True) as snapshot:
        session: AsyncClientSession | None = snapshot
        for info in await _collections(db):
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
            indexes = [
                {k: v for k, v in spec.items() if k not in ("v", "ns")}
                async for spec in await db[name].list_indexes()
                if spec["name"] != "_id_"
            ]
            entries[name] = {
                "file": target.name,
                "documents": documents,
                "bytes": size,
                "sha256": sha,
                "read": read,
                "options": _to_json(info.get("options", {})),
                "indexes": _to_json(indexes),
            }
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
    await asyncio.to_thread(_write_manifest, path, manifest)
    return manifest


# -- Retention -------------------------------------------------------------------------------


async def prune(ctx: Context, keep: int | None = None) -> list[str]:
    """Delete complete backups beyond the newest ``keep`` (``BACKUP_KEEP``), and leftovers of
    crashed attempts older than the oldest kept one; returns the ids removed."""
    keep = keep or ctx.settings.backup_keep
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


# -- Verification ----------------------------------------------------------------------------


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def _read_raw(stream: _Readable, limit: int) -> list[bytes]:
    """Up to ``limit`` length-prefixed BSON documents from ``stream``."""
    out: list[bytes] = []
    while len(out) < limit:
        head = stream.read(4)
        if not head:
            break
        size = int.from_bytes(head, "little")
        if len(head) < 4 or size < 5 or size > 48 * 1024 * 1024:
            raise BSONError("truncated or corrupt document length")
        body = stream.read(size - 4)
        if len(body) != size - 4:
            raise BSONError("truncated document")
        out.append(head + body)
    return out


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def verify(path: Path, progress: Progress | None = None) -> VerifyReport:
    """Check a backup directory against its manifest: every file present with its size and
    sha256, every document decodable, every count as recorded. Blocking (file I/O)."""
    backup_id = path.name
    try:
        manifest = read_manifest(path)
    except (OSError, ValueError) as exc:
        return VerifyReport(backup_id, path, [f"manifest unreadable: {exc}"], {})
    if manifest is None:
        problem = "no such backup" if not path.is_dir() else "no manifest: the backup is incomplete"
        return VerifyReport(backup_id, path, [problem], {})
    problems: list[str] = []
    counts: dict[str, int] = {}
    if manifest.get("format") != FORMAT or manifest.get("id") != backup_id:
        problems.append("manifest: unknown format or another backup's id")
    for name, entry in manifest.get("collections", {}).items():
        file = path / entry["file"]
        if not file.is_file():
            problems.append(f"{name}: file {entry['file']} is missing")
            continue
        if file.stat().st_size != entry["bytes"]:
            problems.append(f"{name}: {file.stat().st_size} bytes, manifest says {entry['bytes']}")
        if _sha256(file) != entry["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest")
        done = 0
        try:
            with gzip.GzipFile(file, "rb") as stream:
                while batch := _read_raw(stream, BATCH):
                    for raw in batch:
                        bson.decode(raw, _DECODE)
                    done += len(batch)
                    if progress is not None:
                        progress(name, done, entry["documents"])
        except (OSError, EOFError, BSONError, ValueError) as exc:
            problems.append(f"{name}: unreadable after {done} documents ({exc})")
        else:
            if done != entry["documents"]:
                problems.append(f"{name}: {done} documents, manifest says {entry['documents']}")
        counts[name] = done
    return VerifyReport(backup_id, path, problems, counts)


# -- Restore ---------------------------------------------------------------------------------


async def occupied(ctx: Context, database: str | None = None) -> dict[str, int]:
    """Documents per data collection of the target database (empty ones left out)."""
    db = ctx.store.db if database is None else ctx.store.client[database]
    counts = {}
    for info in await _collections(db):
        n = await db[info["name"]].estimated_document_count()
        if n:
            counts[info["name"]] = n
    return counts


async def restore(
    ctx: Context,
    backup_id: str,
    *,
    drop: bool = False,
    database: str | None = None,
    progress: Progress | None = None,
    verify_progress: Progress | None = None,
    batch_size: int = BATCH,
) -> RestoreResult:
    """Restore ``backup_id`` into the configured database (or ``database``).

    The backup is verified first. A target holding any data is refused (:class:`Conflict`)
    unless ``drop`` is given, which drops every data collection of the target first (the
    ``backups`` catalogue excepted). Documents are inserted as they were stored, then the
    indexes the code declares and those the backup recorded are created.
    """
    path = locate(ctx.settings, backup_id)
    if not await asyncio.to_thread(path.is_dir):
        raise NotFound(f"No backup {backup_id!r} in {ctx.settings.backup_dir}")
    report = await asyncio.to_thread(verify, path, verify_progress)
    if not report.ok:
        raise CorruptBackup(backup_id, report.problems)
    manifest = await asyncio.to_thread(read_manifest, path)
    assert manifest is not None  # verified
    store = ctx.store if database is None else Store(ctx.store.client, database)
    db = store.db
    present = await occupied(ctx, db.name)
    if present and not drop:
        listed = ", ".join(f"{n} ({c})" for n, c in sorted(present.items()))
        raise Conflict(
            f"Database {db.name!r} holds data: {listed}. Restoring would mix two states; "
            "restore with drop (--drop) to replace it, or into another database"
        )
    started = time.monotonic()
    dropped = []
    if drop:
        for info in await _collections(db):
            await db.drop_collection(info["name"])
            dropped.append(info["name"])
        if dropped:
            log.warning("backup.restore_dropped", database=db.name, collections=dropped)
    counts: dict[str, int] = {}
    for name, entry in manifest["collections"].items():
        counts[name] = await _load(db, name, path / entry["file"], entry, progress, batch_size)
    indexes, conflicts = await _indexes(store, manifest)
    seconds = time.monotonic() - started
    if database is None or database == ctx.settings.mongodb_db:
        await _forget_cache(ctx)
    result = RestoreResult(
        id=backup_id,
        database=db.name,
        collections=counts,
        documents=sum(counts.values()),
        dropped=dropped,
        indexes=indexes,
        index_conflicts=conflicts,
        seconds=seconds,
    )
    log.info(
        "backup.restored",
        backup_id=backup_id,
        database=db.name,
        documents=result.documents,
        seconds=round(seconds, 3),
        docs_per_second=round(result.docs_per_second),
    )
    return result


async def _load(
    db: AsyncDatabase[Doc],
    name: str,
    file: Path,
    entry: dict[str, Any],
    progress: Progress | None,
    batch_size: int,
) -> int:
    options = _from_json(entry.get("options") or {})
    if options:
        # Options (capped, validators, ...) are fixed at creation: start from a fresh one.
        # It is empty, or restore would have been refused.
        await db.drop_collection(name)
        with contextlib.suppress(CollectionInvalid):
            await db.create_collection(name, **options)
    coll = db[name]
    done = 0
    stream = await asyncio.to_thread(gzip.GzipFile, file, "rb")
    try:
        while batch := await asyncio.to_thread(_read_raw, stream, batch_size):
            await coll.insert_many(
                [RawBSONDocument(raw) for raw in batch], bypass_document_validation=True
            )
            done += len(batch)
            if progress is not None:
                progress(name, done, entry["documents"])
    finally:
        await asyncio.to_thread(stream.close)
    if progress is not None and done == 0:
        progress(name, 0, 0)
    return done


async def _indexes(store: Store, manifest: dict[str, Any]) -> tuple[int, list[str]]:
    """Create the declared indexes, then the backed-up ones the code does not declare (an index
    the code declares differently now wins, and is reported)."""
    await store.ensure_indexes()
    present = 0
    conflicts: list[str] = []
    for name, entry in manifest["collections"].items():
        have = await store.db[name].index_information()
        for spec in _from_json(entry.get("indexes") or []):
            if spec["name"] in have:
                present += 1
                continue
            try:
                await store.db.command({"createIndexes": name, "indexes": [spec]})
                present += 1
            except OperationFailure as exc:
                conflicts.append(
                    f"{name}.{spec['name']}: {exc.details and exc.details.get('errmsg')}"
                )
    return present, conflicts


async def _forget_cache(ctx: Context) -> None:
    """Drop cached derived values: they describe the data the restore replaced."""
    try:
        keys = [k async for k in ctx.redis.scan_iter(match=ctx.key("cache", "*"), count=1000)]
        for i in range(0, len(keys), 1000):
            await ctx.redis.delete(*keys[i : i + 1000])
    except RedisError as exc:
        log.warning("backup.cache_not_cleared", error=str(exc))
