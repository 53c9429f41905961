"""mongodump's ``<coll>.metadata.json.gz`` in a full backup (core/backup_metadata.py): written
for every collection, listed and checksummed in the manifest, naming the real indexes of the
source, and checked by ``taskmanager backup verify``."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId, json_util
from click.testing import CliRunner, Result
from pymongo import ASCENDING, DESCENDING, MongoClient

from cli.main import main
from config.settings import Settings
from core import backup_metadata


@pytest.fixture
def env(cli_env: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The settings as environment variables, ``BACKUP_DIR`` in a temporary directory."""
    monkeypatch.setenv("LOG_LEVEL", "WARNING")
    monkeypatch.setenv("BACKUP_DIR", str(tmp_path / "backups"))
    return tmp_path / "backups"


@pytest.fixture
def db(settings: Settings) -> Iterator[Any]:
    """The test database, through a synchronous client."""
    with MongoClient(settings.mongodb_url, tz_aware=True) as client:
        yield client[settings.mongodb_db]


def invoke(*args: str) -> Result:
    """Run ``taskmanager backup ...`` as the console script would."""
    return CliRunner().invoke(main, ["backup", *args])


def test_metadata_files_name_the_real_indexes_and_are_verified(env: Path, db: Any) -> None:
    db["tasks"].insert_many([{"_id": ObjectId(), "title": f"t{i}", "n": i} for i in range(200)])
    db["tasks"].create_index([("owner", ASCENDING), ("due_at", DESCENDING)], name="owner_due")
    db["tasks"].create_index("n", name="n_unique", unique=True)
    db["users"].insert_one({"_id": ObjectId(), "email": "a@example.com"})
    db["users"].create_index("email", name="email_sparse", sparse=True)
    db["sessions"].insert_one({"_id": "s1", "at": 1})
    db["sessions"].create_index("at", name="at_ttl", expireAfterSeconds=3600)

    created = invoke("create")
    assert created.exit_code == 0, created.output
    backup_id = re.search(r"^backup (\S+):", created.stdout, re.M).group(1)  # type: ignore[union-attr]
    folder = env / backup_id
    manifest = json.loads((folder / "manifest.json").read_text())
    infos = {i["name"]: i for i in db.list_collections()}

    assert {"tasks", "users", "sessions"} <= set(manifest["collections"])
    for name, entry in manifest["collections"].items():
        meta = entry["metadata"]
        file = folder / meta["file"]
        assert meta["file"] == f"{name}.metadata.json.gz"  # beside {name}.bson.gz
        assert entry["file"] == f"{name}.bson.gz"
        body = file.read_bytes()
        assert meta["bytes"] == len(body)
        assert meta["sha256"] == hashlib.sha256(body).hexdigest()
        assert file.stat().st_mode & 0o777 == 0o600
        # mongodump's shape, canonical Extended JSON (an int32 is {"$numberInt": ...}).
        text = gzip.decompress(body).decode()
        assert '"v": {"$numberInt": "2"}' in text, text
        doc = backup_metadata.parse(file)
        assert doc["collectionName"] == name and doc["type"] == "collection"
        uuid = infos[name].get("info", {}).get("uuid")
        assert doc.get("uuid") == (bytes(uuid).hex() if uuid is not None else None)
        source = [{k: v for k, v in spec.items() if k != "ns"} for spec in db[name].list_indexes()]
        assert doc["indexes"] == source, name
        assert [list(i["key"].items()) for i in doc["indexes"]] == [
            list(i["key"].items()) for i in source
        ]  # key order is the index
    by_name = {
        n: {
            i["name"]: i for i in backup_metadata.parse(folder / f"{n}.metadata.json.gz")["indexes"]
        }
        for n in ("tasks", "users", "sessions")
    }
    assert {"_id_", "owner_due", "n_unique"} <= by_name["tasks"].keys()
    assert by_name["tasks"]["n_unique"]["unique"] is True
    assert list(by_name["tasks"]["owner_due"]["key"].items()) == [("owner", 1), ("due_at", -1)]
    assert by_name["users"]["email_sparse"]["sparse"] is True
    assert by_name["sessions"]["at_ttl"]["expireAfterSeconds"] == 3600
    # What mongorestore reads back parses as the same JSON with the standard library too.
    assert json.loads(gzip.decompress((folder / "tasks.metadata.json.gz").read_bytes()))

    verified = invoke("verify", backup_id)
    assert verified.exit_code == 0, verified.output

    # A flipped byte in one metadata file: refused, naming the file.
    meta_file = folder / "tasks.metadata.json.gz"
    data = bytearray(meta_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    meta_file.write_bytes(bytes(data))
    refused = invoke("verify", backup_id)
    assert refused.exit_code == 1, refused.output
    problems = [ln for ln in refused.stderr.splitlines() if ln.startswith("problem: ")]
    assert problems == [
        "problem: tasks: sha256 differs from the manifest (file tasks.metadata.json.gz)"
    ], refused.stderr
    assert f"backup {backup_id}: 1 problem(s)" in refused.stdout

    # A missing one, and one whose manifest entry names a path outside the backup.
    (folder / "users.metadata.json.gz").unlink()
    manifest["collections"]["sessions"]["metadata"]["file"] = "../sessions.metadata.json.gz"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    refused = invoke("verify", backup_id)
    assert refused.exit_code == 1, refused.output
    assert "problem: users: file users.metadata.json.gz is missing" in refused.stderr
    assert "problem: sessions: metadata file name '../sessions.metadata.json.gz'" in refused.stderr


def test_metadata_document_is_mongodumps() -> None:
    """The document for a collection with options and a UUID, byte for byte as mongodump's
    canonical Extended JSON orders it (options, indexes, uuid, collectionName, type)."""
    from bson.binary import Binary

    uuid = Binary(bytes(range(16)), 4)
    spec = {"v": 2, "key": {"a": 1, "b": -1}, "name": "a_1_b_-1", "ns": "db.c"}
    doc = backup_metadata.document(
        "c", {"options": {"capped": True}, "info": {"uuid": uuid}}, [spec]
    )
    assert json.loads(backup_metadata.encode(doc)) == {
        "options": {"capped": True},
        "indexes": [
            {
                "v": {"$numberInt": "2"},
                "key": {"a": {"$numberInt": "1"}, "b": {"$numberInt": "-1"}},
                "name": "a_1_b_-1",
            }
        ],
        "uuid": "000102030405060708090a0b0c0d0e0f",
        "collectionName": "c",
        "type": "collection",
    }
    assert list(json.loads(backup_metadata.encode(doc))) == [
        "options",
        "indexes",
        "uuid",
        "collectionName",
        "type",
    ]
    plain = backup_metadata.document("c", {"options": {}}, [])
    assert plain == {"indexes": [], "collectionName": "c", "type": "collection"}
    assert json_util.loads(backup_metadata.encode(plain)) == plain
