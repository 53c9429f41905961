"""The backup format and what taking and restoring a backup share.

A backup is the directory ``BACKUP_DIR/<id>/`` (``id``: UTC time plus a short random part, so
names sort by age). It holds one gzip'd file per collection of length-prefixed BSON documents,
written exactly as the server sent them (``RawBSONDocument``: ObjectIds, datetimes, int32 versus
int64 and field order survive untouched), beside it mongodump's metadata file
(``<coll>.metadata.json.gz``, :mod:`core.backup_metadata`, so ``mongorestore`` can read the
directory), and ``manifest.json``, written last and atomically:
a directory without a manifest is an incomplete backup. The manifest names each collection's
file, document count, size and sha256, its options and its index definitions.

The ``backups`` collection (the catalogue of backups, :mod:`core.backups`) describes files
outside the database, so it is neither backed up nor dropped or overwritten by a restore.

Taking, listing and pruning backups is :mod:`core.backups`; verifying and restoring them is
:mod:`core.restore`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bson import json_util
from bson.timestamp import Timestamp
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.read_concern import ReadConcern

from config.settings import Settings
from core.errors import NotFound
from core.store import Doc

COLLECTION = "backups"
#: Collections never backed up nor touched by a restore (see the module docstring).
SKIP = frozenset({COLLECTION})
MANIFEST = "manifest.json"
FORMAT = 1
ID_RE = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{6}")
BATCH = 1000
#: Seconds of change events a point-in-time restore replays from before a full backup's first
#: read (idempotent, so harmless), in case a write acknowledged before the read began was not
#: yet visible to it (core.archive); retention keeps the segments holding them
#: (core.backup_replication).
REPLAY_MARGIN = 10
#: A backup holds password hashes and emails: its directory and files are the owner's only.
DIR_MODE = 0o700
FILE_MODE = 0o600


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (a rename into it) survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomically(path: Path, value: dict[str, Any]) -> None:
    """Write ``value`` as JSON to ``path`` (mode :data:`FILE_MODE`) so that a reader sees the
    old file or the whole new one, and the new one survives a crash: written aside, fsynced,
    renamed into place, then the directory fsynced."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    with os.fdopen(fd, "w") as out:
        json.dump(value, out, indent=2)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


#: What a manifest may name as a collection's file: one plain name inside the backup's
#: directory (as ``core.backups`` writes them), never a path leaving it.
FILE_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,250}\.bson\.gz")
#: ``progress(collection, documents done, documents expected)``; called after every batch.
Progress = Callable[[str, int, int], None]

_RELAXED = json_util.JSONOptions(json_mode=json_util.JSONMode.RELAXED, tz_aware=True)


def locate(settings: Settings, backup_id: str) -> Path:
    """The directory of ``backup_id`` (which need not exist); :class:`NotFound` for anything
    that is not a backup id, so no path outside ``BACKUP_DIR`` can ever be named."""
    if not ID_RE.fullmatch(backup_id):
        raise NotFound(f"No backup {backup_id!r}")
    return Path(settings.backup_dir) / backup_id


def member(path: Path, name: object) -> Path:
    """The file a manifest calls ``name`` inside the backup directory ``path``; ``ValueError``
    for anything else (absolute paths, ``..``, separators, other kinds of names), so a crafted
    manifest can never make a verify or restore read outside the backup."""
    if not isinstance(name, str) or not FILE_RE.fullmatch(name):
        raise ValueError(f"file name {name!r} is not a file of this backup")
    return path / name


def to_json(value: Any) -> Any:
    """``value``, BSON types included, as plain JSON for the manifest (relaxed Extended JSON)."""
    return json.loads(json_util.dumps(value, json_options=_RELAXED))


def from_json(value: Any) -> Any:
    """The inverse of :func:`to_json`: a manifest's JSON back to BSON values."""
    return json_util.loads(json.dumps(value), json_options=_RELAXED)


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest of the backup in ``path``; ``None`` when absent (an incomplete backup)."""
    try:
        data: dict[str, Any] = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    return data


async def data_collections(db: AsyncDatabase[Doc]) -> list[Doc]:
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


async def operation_time(db: AsyncDatabase[Doc]) -> Timestamp | None:
    """The server's cluster time now, as a majority read sees it (``operationTime`` of a read
    in a session); ``None`` from a server that reports none (a standalone). A full backup
    records it before and after its reads, so the archive's change events can be replayed
    onto it (:mod:`core.archive`)."""
    coll = db.get_collection(COLLECTION, read_concern=ReadConcern("majority"))
    async with db.client.start_session(causal_consistency=False) as session:
        await coll.find_one({"_id": None}, session=session)
        return session.operation_time
