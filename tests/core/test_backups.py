"""Backups against the real MongoDB test server: what a backup holds, that verification catches
damage, and that a restore gives back the very bytes that were backed up."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from bson import Binary, Decimal128, Int64, ObjectId
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from pymongo import ASCENDING
from pymongo.errors import OperationFailure

from config.connections import Connections
from config.settings import Settings
from core import backup_format, backups, restore
from core.context import Context
from core.errors import Conflict, NotFound
from core.pagination import PageQuery
from core.store import INDEXES, Store

RAW: CodecOptions[RawBSONDocument] = CodecOptions(document_class=RawBSONDocument)
T0 = datetime(2024, 5, 1, 12, 30, 15, 123000, tzinfo=UTC)


@pytest.fixture
def settings(make_settings: Any, tmp_path: Path) -> Settings:
    """The test settings, with ``BACKUP_DIR`` in a temporary directory (conftest's ``ctx``
    is built over them)."""
    settings: Settings = make_settings(backup_dir=str(tmp_path / "backups"))
    return settings


async def seed(ctx: Context, tasks: int = 2500) -> dict[str, int]:
    """Users, tasks and events holding the BSON types a lossy copy would change."""
    users = [
        {
            "_id": ObjectId(),
            "email": f"u{i}@example.com",
            "name": f"User {i}",
            "created_at": T0 + timedelta(days=i),
            "prefs": {"remind": {"hours": 24, "email": True}, "z": 1, "a": 2},
        }
        for i in range(3)
    ]
    await ctx.store["users"].insert_many(users)
    owner = str(users[0]["_id"])
    await ctx.store["tasks"].insert_many(
        [
            {
                "_id": ObjectId(),
                "owner": owner,
                "title": f"Task {i} ✓",
                "status": "done" if i % 3 == 0 else "todo",
                "created_at": T0 + timedelta(minutes=i),
                "due_at": None if i % 2 else T0 + timedelta(days=i),
                "tags": ["a", "b"][: i % 3],
                "small": i,  # int32
                "big": Int64(i),  # int64: must not come back as int32
                "ratio": i / 7,
                "money": Decimal128("1.10"),
                "blob": Binary(bytes([i % 256, 0, 255]), 0),
                "nested": {"list": [{"x": i}, [1, 2]], "when": T0},
            }
            for i in range(tasks)
        ]
    )
    await ctx.store["events"].insert_many(
        [
            {"_id": ObjectId(), "type": "task.created", "user_id": owner, "pending": True}
            for _ in range(40)
        ]
    )
    # An index the code does not declare: a backup must carry it all the same.
    await ctx.store["tasks"].create_index([("title", ASCENDING)], name="custom_title")
    return {"users": 3, "tasks": tasks, "events": 40}


async def raw_docs(store: Store, name: str) -> list[bytes]:
    """Every document of a collection as the server stores it, by _id."""
    coll = store.db.get_collection(name, codec_options=RAW)
    docs = await coll.find().sort("_id", ASCENDING).to_list()
    return [bytes(d.raw) for d in docs]


class Recorder:
    """A progress callback that remembers its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    def __call__(self, collection: str, done: int, total: int) -> None:
        self.calls.append((collection, done, total))

    def last(self, collection: str) -> tuple[str, int, int]:
        return [c for c in self.calls if c[0] == collection][-1]


async def test_backup_writes_every_collection_with_a_manifest(ctx: Context) -> None:
    seeded = await seed(ctx)
    await ctx.store["idempotency"].insert_one({"_id": "k", "expires_at": T0})
    progress = Recorder()

    result = await backups.create(ctx, progress=progress, batch_size=1000)

    path = Path(ctx.settings.backup_dir) / result.id
    assert result.path == path and backup_format.ID_RE.fullmatch(result.id)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["id"] == result.id and manifest["status"] == "complete"
    assert manifest["database"] == ctx.settings.mongodb_db
    names = set(await ctx.store.db.list_collection_names()) - {"backups"}
    assert set(manifest["collections"]) == names  # everything, empty collections included
    for name, entry in manifest["collections"].items():
        file = path / entry["file"]
        assert entry["documents"] == await ctx.store[name].count_documents({}), name
        assert entry["bytes"] == file.stat().st_size
        assert entry["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    for name, count in seeded.items():
        assert result.collections[name] == count
    assert manifest["collections"]["idempotency"]["documents"] == 1
    assert result.documents == manifest["documents"] == sum(result.collections.values())
    indexes = {i["name"] for i in manifest["collections"]["tasks"]["indexes"]}
    assert {i.document["name"] for i in INDEXES["tasks"]} | {"custom_title"} == indexes
    assert manifest["read_mode"] in ("snapshot", "plain")
    # The file is the documents as stored, one after another.
    with gzip.open(path / manifest["collections"]["tasks"]["file"], "rb") as f:
        assert f.read() == b"".join(await raw_docs(ctx.store, "tasks"))

    assert progress.last("tasks") == ("tasks", 2500, 2500)
    assert ("tasks", 1000, 2500) in progress.calls  # batch by batch, not at the end only
    record = await backups.get(ctx, result.id)
    assert record["status"] == "succeeded" and record["path"] == str(path)
    assert record["manual"] is True  # an operator's, not a scheduled fire's
    assert {c["name"]: c["documents"] for c in record["collections"]} == result.collections
    assert record["size"] == sum(e["bytes"] for e in manifest["collections"].values())

    report = restore.verify(path)
    assert report.ok, report.problems
    assert report.collections == result.collections


async def test_verify_reports_damage(ctx: Context) -> None:
    await seed(ctx, tasks=300)
    result = await backups.create(ctx)
    manifest = json.loads((result.path / "manifest.json").read_text())
    tasks_file = result.path / manifest["collections"]["tasks"]["file"]

    data = bytearray(tasks_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    tasks_file.write_bytes(bytes(data))
    report = restore.verify(result.path)
    assert not report.ok
    assert any(p.startswith("tasks: sha256") for p in report.problems), report.problems
    assert not any(p.startswith("users") for p in report.problems)
    with pytest.raises(restore.CorruptBackup) as refused:
        await restore.restore(ctx, result.id, drop=True)
    assert "tasks" in refused.value.detail
    assert await ctx.store["tasks"].count_documents({}) == 300  # nothing was dropped

    tasks_file.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    problems = restore.verify(result.path).problems
    assert any("tasks: unreadable" in p for p in problems), problems

    (result.path / "manifest.json").unlink()
    assert restore.verify(result.path).problems == ["no manifest: the backup is incomplete"]
    assert [(b.id, b.complete) for b in backups.scan(ctx.settings)] == [(result.id, False)]


async def test_restore_into_a_fresh_database_is_exact(
    ctx: Context, make_settings: Any, settings: Settings
) -> None:
    seeded = await seed(ctx)
    result = await backups.create(ctx)
    # Registered with make_settings so the database is dropped after the test.
    other = make_settings(mongodb_db=settings.mongodb_db + "_r").mongodb_db
    progress, verifying = Recorder(), Recorder()

    restored = await restore.restore(
        ctx, result.id, database=other, progress=progress, verify_progress=verifying
    )

    target = Store(ctx.store.client, other)
    assert restored.database == other and restored.dropped == []
    assert restored.collections == result.collections
    for name in result.collections:
        assert await raw_docs(target, name) == await raw_docs(ctx.store, name), name
    assert (await raw_docs(target, "tasks"))[0]  # the comparison compared something
    assert len(await raw_docs(target, "tasks")) == seeded["tasks"]
    task = await target["tasks"].find_one({"small": 7})
    assert task is not None and isinstance(task["big"], Int64) and task["created_at"].tzinfo
    for name, declared in INDEXES.items():
        have = await target[name].index_information()
        assert {i.document["name"] for i in declared} <= set(have), name
    assert "custom_title" in await target["tasks"].index_information()
    assert restored.index_conflicts == []
    assert progress.last("tasks") == ("tasks", seeded["tasks"], seeded["tasks"])
    assert verifying.last("tasks")[1] == seeded["tasks"]
    # Measured on the test server (no assertion on speed): read by the README's RTO note.
    print(
        f"restore: {restored.documents} documents in {restored.seconds:.2f} s "
        f"= {restored.docs_per_second:.0f} docs/s"
    )


async def test_restore_refuses_a_database_with_data_unless_told_to_drop(ctx: Context) -> None:
    await seed(ctx, tasks=50)
    result = await backups.create(ctx)
    before = await raw_docs(ctx.store, "tasks")
    gone = await ctx.store["tasks"].find_one_and_delete({"small": 3})
    await ctx.store["tasks"].insert_one({"title": "written after the backup"})
    await ctx.store["webhooks"].insert_one({"url": "http://example.com"})

    cached = ctx.key("cache", "stats", "someone")
    await ctx.redis.set(cached, "{}")
    with pytest.raises(Conflict) as refused:
        await restore.restore(ctx, result.id)
    assert "tasks (50)" in refused.value.detail
    assert await ctx.redis.get(cached) is not None
    assert await ctx.store["tasks"].count_documents({"title": "written after the backup"}) == 1

    restored = await restore.restore(ctx, result.id, drop=True)
    assert gone is not None
    assert await raw_docs(ctx.store, "tasks") == before
    assert await ctx.store["webhooks"].count_documents({}) == 0  # empty in the backup
    assert "tasks" in restored.dropped and "backups" not in restored.dropped
    assert await ctx.redis.get(cached) is None  # it described the replaced data
    # The catalogue survives a restore: it describes the files, not the data.
    assert (await backups.get(ctx, result.id))["status"] == "succeeded"


async def test_falls_back_to_plain_reads_without_snapshots(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A standalone server refuses snapshot reads; a long backup outlives the snapshot window
    (SnapshotTooOld). Either way the collection is read again, plainly."""
    await seed(ctx, tasks=120)
    real_dump: Callable[..., Any] = backups._dump
    seen: list[tuple[str, bool]] = []

    async def dump(coll: Any, session: Any, *args: Any) -> Any:
        seen.append((coll.name, session is not None))
        if session is not None and coll.name == "tasks":
            raise OperationFailure("Read timestamp is older than the oldest available", 239)
        return await real_dump(coll, session, *args)

    monkeypatch.setattr(backups, "_dump", dump)
    result = await backups.create(ctx)

    manifest = backup_format.read_manifest(result.path)
    assert manifest is not None and manifest["read_mode"] == "plain"
    reads = {name: e["read"] for name, e in manifest["collections"].items()}
    assert reads["tasks"] == "plain" and reads["users"] == "plain"  # after tasks: plain
    assert reads["events"] == "snapshot"  # before tasks (alphabetical)
    assert ("tasks", True) in seen and ("tasks", False) in seen
    assert result.collections["tasks"] == 120
    assert restore.verify(result.path).ok


async def test_a_failed_backup_is_recorded_and_retried_from_scratch(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    await seed(ctx, tasks=20)
    doc = await backups.request(ctx)
    real_dump: Callable[..., Any] = backups._dump

    async def broken(coll: Any, *args: Any) -> Any:
        if coll.name == "tasks":
            raise OSError("No space left on device")
        return await real_dump(coll, *args)

    monkeypatch.setattr(backups, "_dump", broken)
    with pytest.raises(OSError, match="No space left"):
        await backups.create(ctx, doc["_id"], fire_key="backup:manual:x")
    record = await backups.get(ctx, doc["_id"])
    assert record["status"] == "failed" and "No space left" in record["error"]
    assert not (Path(ctx.settings.backup_dir) / doc["_id"]).exists()

    monkeypatch.setattr(backups, "_dump", real_dump)
    result = await backups.create(ctx, doc["_id"], fire_key="backup:manual:x")
    record = await backups.get(ctx, doc["_id"])
    assert record["status"] == "succeeded" and record["attempts"] == 2
    assert record["error"] is None and record["manual"] is True
    assert result.collections["tasks"] == 20
    # A redelivered message for a backup that succeeded does not take it again.
    mtime = (result.path / "manifest.json").stat().st_mtime_ns
    again = await backups.create(ctx, doc["_id"])
    assert again.id == result.id and again.documents == result.documents
    assert (result.path / "manifest.json").stat().st_mtime_ns == mtime


async def test_prune_keeps_the_newest_backups(make_settings: Any, tmp_path: Path) -> None:
    settings = make_settings(backup_dir=str(tmp_path / "b"), backup_keep=2)
    connections = Connections(settings)
    ctx = Context(settings, Store(connections.mongo(), settings.mongodb_db), connections.redis())
    try:
        await ctx.store["users"].insert_one({"email": "a@example.com"})
        ids = [backups.new_id(T0 + timedelta(hours=6 * i)) for i in range(4)]
        crashed = backups.new_id(T0 - timedelta(hours=1))  # a leftover without a manifest
        (tmp_path / "b" / crashed).mkdir(parents=True)
        pruned: list[list[str]] = []
        for backup_id in ids:
            pruned.append((await backups.create(ctx, backup_id)).pruned)
        assert pruned[:2] == [[], []]
        assert pruned[2] == sorted([ids[0], crashed]) and pruned[3] == [ids[1]]
        assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ids[2:]
        assert (await backups.get(ctx, ids[0]))["status"] == "pruned"
        assert (await backups.get(ctx, ids[3]))["status"] == "succeeded"
        page = await backups.page(ctx, PageQuery(limit=3))
        assert [b.id for b in page.items] == ids[::-1][:3] and page.next_cursor
        rest = await backups.page(ctx, PageQuery(limit=3, cursor=page.next_cursor))
        assert [b.id for b in rest.items] == [ids[0]] and rest.next_cursor is None
    finally:
        await ctx.store.client.close()
        await ctx.redis.aclose()


async def test_ids_never_name_a_path_outside_the_backup_dir(ctx: Context) -> None:
    for bad in ("../../etc", "20240101T000000Z-abcdef/../x", "", "manifest.json"):
        with pytest.raises(NotFound):
            backup_format.locate(ctx.settings, bad)
        with pytest.raises(NotFound):
            await backups.get(ctx, bad)
    with pytest.raises(NotFound):
        await restore.restore(ctx, backups.new_id())  # well-formed, but no such backup
