"""Verifying and restoring backups (the format is :mod:`core.backup_format`).

Verification checks a backup directory against its manifest: every file present with its size
and sha256, every document decodable, every count as recorded. A restore verifies first, refuses
a target database holding data unless told to drop it, inserts the documents as they were
stored and recreates the indexes; restoring the configured database also drops the cached
values that described the data it replaced. The ``backups`` catalogue is never dropped or
overwritten by a restore.

Inserting is a pipeline per collection: one reader decodes batches from the gzip'd file (in a
thread) while ``RESTORE_CONCURRENCY`` unordered ``insert_many`` calls are in flight at once;
the indexes are built after the documents are in (bench/dr.py measures both halves).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import re
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import bson
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.errors import BSONError
from bson.raw_bson import RawBSONDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import CollectionInvalid, OperationFailure
from redis.exceptions import RedisError

from config.logging import get_logger
from core import backup_metadata
from core.backup_format import (
    BATCH,
    FORMAT,
    Progress,
    data_collections,
    from_json,
    locate,
    member,
    read_manifest,
)
from core.context import Context
from core.errors import Conflict, FieldError, Invalid, NotFound
from core.store import Doc, Store

log = get_logger(__name__)

#: Verification decodes every value; a date outside Python's range is still valid BSON.
_DECODE: CodecOptions[dict[str, Any]] = CodecOptions(
    datetime_conversion=DatetimeConversion.DATETIME_AUTO
)


#: A collection name a restore may create: no system collection, no ``$`` and no NUL
#: (MongoDB's own rules, plus ``system.``, which a backup never holds).
COLLECTION_RE = re.compile(r"(?!system\.)[^$\x00]{1,255}")


class CorruptBackup(Invalid):
    """A backup whose files do not match its manifest (or that has none)."""

    def __init__(self, backup_id: str, problems: list[str]):
        super().__init__(
            f"Backup {backup_id} failed verification: " + "; ".join(problems[:5]),
            [FieldError(field="backup", message=p) for p in problems],
        )
        self.problems = problems


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
    #: Of ``seconds``, the time spent building indexes (the rest is inserting).
    index_seconds: float = 0.0
    #: Concurrent ``insert_many`` calls per collection.
    concurrency: int = 1

    @property
    def docs_per_second(self) -> float:
        """Restore throughput (verification excluded)."""
        return self.documents / self.seconds if self.seconds > 0 else 0.0


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
    collections = manifest.get("collections")
    if not isinstance(collections, dict):
        return VerifyReport(backup_id, path, [*problems, "manifest: no collections"], {})
    for name, entry in collections.items():
        wrong = _check_entry(name, entry)
        if wrong is None:
            try:
                file = member(path, entry["file"])
            except ValueError as exc:
                wrong = str(exc)
        if wrong is not None:
            problems.append(f"{name}: {wrong}")
            continue
        counts[name] = _verify_file(name, file, entry, problems, progress)
    # mongodump's metadata files too (read by mongorestore, not by our restore): a backup
    # whose files do not all match its manifest is refused whole.
    problems += backup_metadata.verify(path)
    return VerifyReport(backup_id, path, problems, counts)


def _check_entry(name: object, entry: object) -> str | None:
    """What is wrong with one manifest entry's shape (``None``: nothing)."""
    if not isinstance(name, str) or not COLLECTION_RE.fullmatch(name):
        return f"{name!r} is not a collection name this platform backs up"
    if not isinstance(entry, dict):
        return "manifest entry is not an object"
    for key, kind in (("file", str), ("bytes", int), ("documents", int), ("sha256", str)):
        if not isinstance(entry.get(key), kind):
            return f"manifest entry has no valid {key!r}"
    return None


def _verify_file(
    name: str,
    file: Path,
    entry: dict[str, Any],
    problems: list[str],
    progress: Progress | None,
) -> int:
    """Check one collection's file; appends what is wrong (naming the file) to ``problems``
    and returns how many documents were read."""
    where = f"(file {file.name})"
    try:
        if not file.is_file():
            problems.append(f"{name}: file {file.name} is missing")
            return 0
        size = file.stat().st_size
        if size != entry["bytes"]:
            problems.append(f"{name}: {size} bytes, manifest says {entry['bytes']} {where}")
        if _sha256(file) != entry["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest {where}")
    except OSError as exc:
        problems.append(f"{name}: unreadable ({exc}) {where}")
        return 0
    done = 0
    try:
        with gzip.GzipFile(file, "rb") as stream:
            while batch := _read_raw(stream, BATCH):
                for raw in batch:
                    bson.decode(raw, _DECODE)
                done += len(batch)
                if progress is not None:
                    progress(name, done, entry["documents"])
    except (OSError, EOFError, BSONError, ValueError, zlib.error) as exc:
        # zlib.error is no OSError: a corrupt deflate stream raises it from GzipFile.read.
        problems.append(f"{name}: unreadable after {done} documents ({exc}) {where}")
    else:
        if done != entry["documents"]:
            problems.append(f"{name}: {done} documents, manifest says {entry['documents']} {where}")
    return done


# -- Restore ---------------------------------------------------------------------------------


async def occupied(ctx: Context, database: str | None = None) -> dict[str, int]:
    """Documents per data collection of the target database (empty ones left out)."""
    db = ctx.store.db if database is None else ctx.store.client[database]
    counts = {}
    for info in await data_collections(db):
        n = await db[info["name"]].estimated_document_count()
        if n:
            counts[info["name"]] = n
    return counts


async def refuse_occupied(ctx: Context, database: str, *, drop: bool) -> None:
    """Refuse (:class:`Conflict`) to restore into ``database`` while it holds data, unless
    ``drop``: restoring over data would mix two states."""
    present = await occupied(ctx, database)
    if present and not drop:
        listed = ", ".join(f"{n} ({c})" for n, c in sorted(present.items()))
        raise Conflict(
            f"Database {database!r} holds data: {listed}. Restoring would mix two states; "
            "restore with drop (--drop) to replace it, or into another database"
        )


async def restore(
    ctx: Context,
    backup_id: str,
    *,
    drop: bool = False,
    database: str | None = None,
    progress: Progress | None = None,
    verify_progress: Progress | None = None,
    batch_size: int = BATCH,
    concurrency: int | None = None,
) -> RestoreResult:
    """Restore ``backup_id`` into the configured database (or ``database``).

    The backup is verified first. A target holding any data is refused (:class:`Conflict`)
    unless ``drop`` is given, which drops every data collection of the target first (the
    ``backups`` catalogue excepted). Documents are inserted as they were stored, up to
    ``concurrency`` batches at once (default ``RESTORE_CONCURRENCY``), then the indexes the
    code declares and those the backup recorded are created.
    """
    concurrency = concurrency or ctx.settings.restore_concurrency
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
    await refuse_occupied(ctx, db.name, drop=drop)
    started = time.monotonic()
    dropped = []
    if drop:
        for info in await data_collections(db):
            await db.drop_collection(info["name"])
            dropped.append(info["name"])
        if dropped:
            log.warning("backup.restore_dropped", database=db.name, collections=dropped)
    counts: dict[str, int] = {}
    for name, entry in manifest["collections"].items():
        file = member(path, entry["file"])  # verified already; never a path outside it
        counts[name] = await _load(db, name, file, entry, progress, batch_size, concurrency)
    indexing = time.monotonic()
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
        index_seconds=time.monotonic() - indexing,
        concurrency=concurrency,
    )
    log.info(
        "backup.restored",
        backup_id=backup_id,
        database=db.name,
        documents=result.documents,
        seconds=round(seconds, 3),
        index_seconds=round(result.index_seconds, 3),
        concurrency=concurrency,
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
    concurrency: int,
) -> int:
    """Insert one collection's file: a reader decodes batches while up to ``concurrency``
    unordered ``insert_many`` calls run; the first failure cancels the rest and is raised."""
    options = from_json(entry.get("options") or {})
    if options:
        # Options (capped, validators, ...) are fixed at creation: start from a fresh one.
        # It is empty, or restore would have been refused.
        await db.drop_collection(name)
        with contextlib.suppress(CollectionInvalid):
            await db.create_collection(name, **options)
    coll = db[name]
    done = 0
    # Bounded: at most ``concurrency`` batches wait decoded, beside those being inserted.
    batches: asyncio.Queue[list[bytes] | None] = asyncio.Queue(maxsize=concurrency)
    stream = await asyncio.to_thread(gzip.GzipFile, file, "rb")

    async def read() -> None:
        while batch := await asyncio.to_thread(_read_raw, stream, batch_size):
            await batches.put(batch)
        for _ in range(concurrency):
            await batches.put(None)

    async def insert() -> None:
        nonlocal done
        while (batch := await batches.get()) is not None:
            # Unordered: the server may apply a batch in any order (an empty target and
            # distinct _ids leave nothing to order), and parallel calls interleave anyway.
            await coll.insert_many(
                [RawBSONDocument(raw) for raw in batch],
                ordered=False,
                bypass_document_validation=True,
            )
            done += len(batch)
            if progress is not None:
                progress(name, done, entry["documents"])

    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(read())
            for _ in range(concurrency):
                group.create_task(insert())
    except BaseExceptionGroup as exc:
        # One failure is the cause; the others are the cancellations it caused.
        raise exc.exceptions[0] from None
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
        for spec in from_json(entry.get("indexes") or []):
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
