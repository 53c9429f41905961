"""mongodump's metadata files in a full backup, so that ``mongorestore`` alone can restore it.

Beside each collection's ``<coll>.bson.gz`` (the documents, already what ``mongodump --gzip``
writes), a full backup holds ``<coll>.metadata.json.gz``: the gzip'd JSON document mongodump
writes for a collection (its ``Metadata`` struct, marshalled as canonical Extended JSON)::

    {"options": {...}, "indexes": [{"v": 2, "key": {...}, "name": ..., ...}, ...],
     "uuid": "<32 hex digits>", "collectionName": "<coll>", "type": "collection"}

``options`` and ``uuid`` are left out when empty or unknown (as mongodump does); ``indexes`` are
every index ``listIndexes`` returned, ``_id_`` included, field order kept (``ns``, which only
old servers report, left out: it would name the source database). The file is checksummed and
listed in the manifest (``collections.<coll>.metadata``: ``file``, ``bytes``, ``sha256``),
replicated to the remote targets with the rest (:mod:`core.backup_replication`) and checked by
:func:`verify`. This project's own restore reads the options and indexes from the manifest, not
from these files. A backup taken before these files existed has no ``metadata`` entries.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import zlib
from pathlib import Path
from typing import Any

from bson import json_util
from bson.binary import Binary

from core.backup_format import FILE_MODE, read_manifest

#: What a manifest may name as a collection's metadata file (a plain name inside the backup).
METADATA_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,250}\.metadata\.json\.gz")
_DATA_SUFFIX = ".bson.gz"
_SUFFIX = ".metadata.json.gz"


def file_name(data_file: str) -> str:
    """The metadata file beside the data file ``data_file`` (``tasks.bson.gz`` ->
    ``tasks.metadata.json.gz``), as mongorestore pairs them."""
    if not data_file.endswith(_DATA_SUFFIX):
        raise ValueError(f"{data_file!r} is not a collection file")
    return data_file[: -len(_DATA_SUFFIX)] + _SUFFIX


def document(
    collection: str, info: dict[str, Any], indexes: list[dict[str, Any]]
) -> dict[str, Any]:
    """mongodump's metadata document of ``collection`` (``info``: its ``listCollections``
    entry; ``indexes``: what ``listIndexes`` returned)."""
    doc: dict[str, Any] = {}
    options = info.get("options") or {}
    if options:
        doc["options"] = dict(options)
    doc["indexes"] = [{k: v for k, v in spec.items() if k != "ns"} for spec in indexes]
    uuid = (info.get("info") or {}).get("uuid")
    if isinstance(uuid, Binary) and len(uuid) == 16:
        doc["uuid"] = bytes(uuid).hex()
    doc["collectionName"] = collection
    doc["type"] = "collection"
    return doc


def encode(doc: dict[str, Any]) -> bytes:
    """``doc`` as mongodump writes it: canonical Extended JSON on one line."""
    return json_util.dumps(doc, json_options=json_util.CANONICAL_JSON_OPTIONS).encode()


def write(
    folder: Path, data_file: str, collection: str, info: dict[str, Any], indexes: list[Any]
) -> dict[str, Any]:
    """Write the metadata file of ``collection`` (whose documents are ``data_file``) into the
    backup directory ``folder``, owner-only and durable; returns its manifest entry
    (``file``, ``bytes``, ``sha256``). Blocking (file I/O)."""
    name = file_name(data_file)
    body = gzip.compress(encode(document(collection, info, indexes)), compresslevel=6, mtime=0)
    fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    with os.fdopen(fd, "wb") as out:
        out.write(body)
        out.flush()
        os.fsync(out.fileno())
    return {"file": name, "bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}


def files(folder: Path, entry: object) -> list[Path]:
    """The metadata file a manifest entry names inside ``folder`` (none for a backup taken
    before these files existed); ``ValueError`` for a name that is not a metadata file of this
    backup (a path leaving it, say)."""
    meta = entry.get("metadata") if isinstance(entry, dict) else None
    if meta is None:
        return []
    name = meta.get("file") if isinstance(meta, dict) else None
    if not isinstance(name, str) or not METADATA_RE.fullmatch(name):
        raise ValueError(f"metadata file name {name!r} is not a file of this backup")
    return [folder / name]


def verify(folder: Path) -> list[str]:
    """Check every metadata file the manifest of the backup in ``folder`` names: present, its
    size and sha256 as recorded, gzip'd canonical Extended JSON naming its collection with a
    list of indexes. Returns the problems, each naming the file (empty: all good; a missing or
    unreadable manifest is left to :func:`core.restore.verify`). Blocking (file I/O)."""
    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError):
        return []
    collections = (manifest or {}).get("collections")
    if not isinstance(collections, dict):
        return []
    problems: list[str] = []
    for name, entry in collections.items():
        try:
            found = files(folder, entry)
        except ValueError as exc:
            problems.append(f"{name}: {exc}")
            continue
        if found:
            problem = _check(str(name), found[0], entry["metadata"])
            if problem is not None:
                problems.append(f"{name}: {problem}")
    return problems


def _check(collection: str, file: Path, meta: dict[str, Any]) -> str | None:
    where = f"(file {file.name})"
    if not isinstance(meta.get("bytes"), int) or not isinstance(meta.get("sha256"), str):
        return f"manifest entry of {file.name} has no valid 'bytes' or 'sha256'"
    try:
        body = file.read_bytes()
    except FileNotFoundError:
        return f"file {file.name} is missing"
    except OSError as exc:
        return f"unreadable ({exc}) {where}"
    if len(body) != meta["bytes"]:
        return f"{len(body)} bytes, manifest says {meta['bytes']} {where}"
    if hashlib.sha256(body).hexdigest() != meta["sha256"]:
        return f"sha256 differs from the manifest {where}"
    try:
        doc = json_util.loads(gzip.decompress(body))
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        return f"metadata unreadable ({exc}) {where}"
    if not isinstance(doc, dict) or doc.get("collectionName") != collection:
        return f"metadata names another collection {where}"
    if not isinstance(doc.get("indexes"), list):
        return f"metadata has no list of indexes {where}"
    return None


def parse(file: Path) -> dict[str, Any]:
    """A metadata file's document, BSON values restored (for tests and tools)."""
    doc: dict[str, Any] = json_util.loads(gzip.decompress(file.read_bytes()))
    return doc
