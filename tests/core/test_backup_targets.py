"""Backup targets against a real S3-protocol server (moto's server mode, on loopback): full
backups and archive segments reach both remote targets, a backup is visible there only once its
manifest is, a restore from the S3 copy alone gives back the source, retention keeps N full
backups and the segments they need on each target, and an off-site outage neither fails the
local backup nor loses the copy, which catches up once the target is back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
from prometheus_client import REGISTRY

from config.connections import Connections
from config.settings import Settings
from core import archive, backup_replication, backup_targets, backups, restore
from core.backup_replication import Holdings, holdings
from core.backup_targets import LocalTarget, S3Target, TargetError, parse_target
from core.context import Context, open_context
from tests.config.logs import captured_logs
from tests.conftest import MotoServer
from tests.core.test_backups import raw_docs, seed


def s3_url(server: MotoServer, bucket: str, prefix: str = "tm/backups", **opts: Any) -> str:
    """A target URL for a bucket of the test's moto server."""
    query = "&".join([f"endpoint_url={server.endpoint}", *(f"{k}={v}" for k, v in opts.items())])
    return f"s3://{bucket}/{prefix}?{query}"


def held(settings: Settings, name: str) -> Holdings:
    """What the target ``name`` holds now."""
    target = backup_targets.find_target(settings, name)
    try:
        return holdings(target.keys())
    finally:
        target.close()


@pytest.fixture
def settings(
    make_settings: Any, tmp_path: Path, moto_server: MotoServer, aws_env: dict[str, str]
) -> Settings:
    """BACKUP_DIR in the test's folder; primary and off-site targets: two buckets of the moto
    server (the conftest ``ctx`` is built over these settings)."""
    made: Settings = make_settings(
        backup_dir=str(tmp_path / "backups"),
        backup_target=s3_url(moto_server, moto_server.bucket()),
        backup_offsite_target=s3_url(moto_server, moto_server.bucket(), "offsite"),
    )
    return made


# -- Targets ---------------------------------------------------------------------------------


def test_target_urls(tmp_path: Path) -> None:
    s3 = parse_target("primary", "s3://bkt/a/b?endpoint_url=http://10.0.0.1:9000&keep=3")
    assert isinstance(s3, S3Target)
    assert (s3.bucket, s3.prefix, s3.keep) == ("bkt", "a/b/", 3)
    assert s3.describe() == "s3://bkt/a/b/ at 10.0.0.1:9000"
    folder = parse_target("offsite", f"file://{tmp_path}/copy")
    assert isinstance(folder, LocalTarget) and folder.root == tmp_path / "copy"
    with pytest.raises(TargetError, match="no credentials in the URL"):
        parse_target("primary", "s3://AKIA:secret@bkt/x")
    with pytest.raises(TargetError, match="unknown option"):
        parse_target("primary", "s3://bkt/x?secret_key=abc")
    with pytest.raises(TargetError, match="keep must be"):
        parse_target("primary", "s3://bkt/x?keep=0")
    with pytest.raises(TargetError, match="not s3:// or file://"):
        parse_target("primary", "ftp://host/x")
    with pytest.raises(ValueError, match="without credentials"):
        Settings(backup_target="s3://AKIA:secret@bkt/x")


def test_a_folder_target_is_owner_only_and_writes_whole_files(tmp_path: Path) -> None:
    source = tmp_path / "f"
    source.write_bytes(b"x" * 10_000)
    target = LocalTarget("offsite", tmp_path / "copy")
    target.put("20260101T000000Z-abcdef/tasks.bson.gz", source)
    stored = tmp_path / "copy" / "20260101T000000Z-abcdef" / "tasks.bson.gz"
    assert stored.read_bytes() == source.read_bytes()
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    for folder in (tmp_path / "copy", stored.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    # A copy cut off leaves only a ``.part`` file, which is never listed.
    (stored.parent / "manifest.json.1234.part").write_bytes(b"{")
    assert target.keys() == {"20260101T000000Z-abcdef/tasks.bson.gz": 10_000}
    with pytest.raises(TargetError):
        target.put("../escape", source)
    target.delete(["20260101T000000Z-abcdef/tasks.bson.gz"])
    assert target.keys() == {}


# -- Replication -----------------------------------------------------------------------------


async def test_a_backup_reaches_both_targets(ctx: Context) -> None:
    await seed(ctx, tasks=300)
    result = await backups.create(ctx)

    assert [(r.target, r.ok) for r in result.replicated] == [("primary", True), ("offsite", True)]
    local = holdings(backup_targets.local_target(ctx.settings).keys())
    for name in ("primary", "offsite"):
        copy = held(ctx.settings, name)
        assert copy.fulls == {result.id} and not copy.partial
        # Every file, byte for byte the size of the local one.
        assert {k: v for k, v in copy.sizes.items() if k.startswith(result.id)} == {
            k: v for k, v in local.sizes.items() if k.startswith(result.id)
        }
    status = backup_replication.read_status(ctx.settings)
    assert status["primary"]["last_ok"] and "last_failure" not in status["primary"]
    # Replicating again uploads nothing.
    [again, _] = await asyncio.to_thread(backup_replication.replicate, ctx.settings)
    assert again.ok and again.uploaded_fulls == [] and again.bytes == 0


class _CutOff(S3Target):
    """An S3 target whose process "dies" when it is about to store a manifest."""

    def put(self, key: str, source: Path) -> None:
        if key.endswith("/manifest.json"):
            raise KeyboardInterrupt("killed between the files and the manifest")
        super().put(key, source)


async def test_a_backup_cut_off_before_its_manifest_is_not_listed(ctx: Context) -> None:
    await seed(ctx, tasks=50)
    result = await backups.create(ctx)
    real = backup_targets.find_target(ctx.settings, "primary")
    assert isinstance(real, S3Target)
    # A second bucket, copied to by a process killed right before the manifest.
    bucket = f"{real.bucket}-cut"
    client = boto3.client("s3", endpoint_url=real.endpoint_url)
    client.create_bucket(Bucket=bucket)
    client.close()
    cut = _CutOff("primary", bucket, "p", endpoint_url=real.endpoint_url)
    with pytest.raises(KeyboardInterrupt):
        await asyncio.to_thread(backup_replication.sync, ctx.settings, cut)

    found = holdings(cut.keys())
    assert found.fulls == set() and found.partial == {result.id}  # files there, not listed
    assert any(k.endswith(".bson.gz") for k in found.sizes)
    tmp = Path(ctx.settings.backup_dir).parent / "fetch"
    with pytest.raises(TargetError, match="holds no complete backup"):
        backup_replication.fetch_backup(cut, result.id, tmp)
    # The next replication (a live process) finishes it.
    whole = S3Target("primary", bucket, "p", endpoint_url=real.endpoint_url)
    report = await asyncio.to_thread(backup_replication.sync, ctx.settings, whole)
    assert report.uploaded_fulls == [result.id]
    assert holdings(whole.keys()).fulls == {result.id}


async def test_restore_from_the_s3_copy_alone(ctx: Context, tmp_path: Path) -> None:
    await seed(ctx)
    result = await backups.create(ctx)
    expected = {n: await raw_docs(ctx.store, n) for n in ("users", "tasks", "events")}
    shutil.rmtree(ctx.settings.backup_dir)  # the local disk is gone

    target = backup_targets.find_target(ctx.settings, "primary")
    fetched = tmp_path / "fetched"
    await asyncio.to_thread(backup_replication.fetch_backup, target, result.id, fetched)
    from_s3 = Context(
        ctx.settings.model_copy(update={"backup_dir": str(fetched)}), ctx.store, ctx.redis
    )
    into = ctx.settings.mongodb_db + "_s3"
    try:
        done = await restore.restore(from_s3, result.id, database=into)
        assert done.documents == sum(len(v) for v in expected.values())
        store = type(ctx.store)(ctx.store.client, into)
        for name, docs in expected.items():
            assert await raw_docs(store, name) == docs, name
    finally:
        await ctx.store.client.drop_database(into)


@pytest.mark.timeout(240)  # a full backup, segments and a restore through S3: > 60 s loaded
async def test_point_in_time_restore_from_the_s3_copy_alone(
    make_settings: Any, tmp_path: Path, moto_server: MotoServer, aws_env: dict[str, str]
) -> None:
    settings = make_settings(
        backup_dir=str(tmp_path / "backups"),
        backup_target=s3_url(moto_server, moto_server.bucket()),
    )
    async with open_context(settings, Connections(settings)) as ctx:
        db = ctx.store.db
        await db["items"].insert_many([{"_id": i, "v": 0} for i in range(20)])
        arch = archive.Archiver(ctx, interval=0.5, lock_ttl_ms=3000, heal=False)
        task = asyncio.create_task(arch.run())
        try:
            while arch.segments_written < 1:
                await asyncio.sleep(0.1)
            await backups.create(ctx)
            for i in range(20):
                await db["items"].update_one({"_id": i}, {"$set": {"v": 1}})
            await db["items"].delete_one({"_id": 3})
            await asyncio.sleep(1.2)
            moment = datetime.now(UTC)
            expected = {d["_id"]: d async for d in db["items"].find({})}
            await asyncio.sleep(1.2)
            await db["items"].update_many({}, {"$set": {"v": 2}})
            written = arch.segments_written
            while arch.segments_written < written + 3:
                await asyncio.sleep(0.1)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # The archiver copied its segments as it went (in the background); one last pass for
        # the newest.
        assert held(settings, "primary").segments
        [report] = await asyncio.to_thread(backup_replication.replicate, settings)
        assert report.ok
        local_segments = holdings(backup_targets.local_target(settings).keys()).segments
        remote = held(settings, "primary")
        assert remote.segments == local_segments and len(remote.fulls) == 1
        shutil.rmtree(settings.backup_dir)

        fetched = tmp_path / "fetched"
        target = backup_targets.find_target(settings, "primary")
        await asyncio.to_thread(backup_replication.fetch_for_moment, target, moment, fetched)
        from_s3 = Context(
            settings.model_copy(update={"backup_dir": str(fetched)}), ctx.store, ctx.redis
        )
        into = settings.mongodb_db + "_pitr_s3"
        try:
            await archive.restore_at(from_s3, moment, into)
            got = {d["_id"]: d async for d in ctx.store.client[into]["items"].find({})}
            assert got == expected
        finally:
            await ctx.store.client.drop_database(into)


# -- Retention -------------------------------------------------------------------------------


def _segments(root: Path, chain: str, bounds: list[tuple[int, int]]) -> list[str]:
    """Segment files of a chain covering the given (from, to) seconds, as the archiver names
    them (contents do not matter to retention)."""
    folder = root / "archive" / chain
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for seq, (start, end) in enumerate(bounds, 1):
        name = archive.segment_name(seq, (start, 1), (end, 1))
        (folder / name).write_bytes(b"segment")
        keys.append(f"archive/{chain}/{name}")
    return keys


async def test_retention_keeps_n_fulls_and_the_segments_they_need(
    make_settings: Any, tmp_path: Path, moto_server: MotoServer, aws_env: dict[str, str]
) -> None:
    settings = make_settings(
        backup_dir=str(tmp_path / "backups"),
        backup_keep=3,
        backup_target=s3_url(moto_server, moto_server.bucket(), keep=2),
        backup_offsite_target=f"file://{tmp_path}/offsite?keep=4",
    )
    root = Path(settings.backup_dir)
    starts: dict[str, int] = {}
    async with open_context(settings, Connections(settings)) as ctx:
        await ctx.store["tasks"].insert_one({"_id": 1})
        for _ in range(5):
            backup_id = (await backups.create(ctx)).id
            manifest = json.loads((root / backup_id / "manifest.json").read_text())
            starts[backup_id] = manifest["cluster_time"]["start"][0]
            await asyncio.sleep(1.1)  # a second apart: each keeps different segments
    taken = sorted(starts)
    first, last = min(starts.values()), max(starts.values())
    # An old chain, ended before every backup; the current one, in 1 s segments from well
    # before the first backup to after the last.
    old = _segments(root, "20200101T000000Z-aaaaaa", [(first - 900, first - 800)])
    current = _segments(
        root,
        "20200102T000000Z-bbbbbb",
        [(first - 30 + i, first - 29 + i) for i in range(last - first + 40)],
    )

    reports = await asyncio.to_thread(backup_replication.replicate, settings)
    assert all(r.ok for r in reports), reports

    def needed(keep: int) -> set[str]:
        oldest = min(starts[i] for i in taken[-keep:]) - 10  # REPLAY_MARGIN before it
        ends = {k: int(k.rsplit("_", 1)[1].split(".")[0]) for k in current}
        return {k for k in current if ends[k] >= oldest} | {current[-1]}

    assert needed(2) < needed(3) < needed(4) < set(current)
    for name, keep in (("primary", 2), ("offsite", 4)):
        copy = held(settings, name)
        assert sorted(copy.fulls) == taken[-keep:], name
        kept = {s.key for segs in copy.segments.values() for s in segs}
        assert kept == needed(keep), name
        assert not set(old) & kept
    # Locally (BACKUP_KEEP=3): the backups were pruned as they were taken; the segments now.
    async with open_context(settings, Connections(settings)) as ctx:
        await backups.prune(ctx)
    local = holdings(backup_targets.local_target(settings).keys())
    assert sorted(local.fulls) == taken[-3:]
    assert {s.key for segs in local.segments.values() for s in segs} == needed(3)


def test_retention_keeps_every_segment_without_cluster_times() -> None:
    sizes = {
        "20260101T000000Z-aaaaaa/manifest.json": 1,
        "20260102T000000Z-aaaaaa/manifest.json": 1,
        "archive/20250101T000000Z-cccccc/00000001_1.1_2.1.jsonl.gz": 1,
    }
    plan = backup_replication.plan_retention(holdings(sizes), 1, lambda _: None)
    assert plan.kept == ["20260102T000000Z-aaaaaa"] and plan.fulls == ["20260101T000000Z-aaaaaa"]
    assert plan.segments == []


# -- Outages ---------------------------------------------------------------------------------


async def test_offsite_outage_then_catch_up(
    make_settings: Any,
    tmp_path: Path,
    moto_server: MotoServer,
    aws_env: dict[str, str],
) -> None:
    offsite = MotoServer()  # its port, with nothing listening yet: the region is down
    bucket = "tm-offsite-copy"
    settings = make_settings(
        backup_dir=str(tmp_path / "backups"),
        backup_target=s3_url(moto_server, moto_server.bucket()),
        backup_offsite_target=f"s3://{bucket}/copy?endpoint_url={offsite.endpoint}",
    )
    failures = (
        REGISTRY.get_sample_value(
            "taskmanager_backup_replication_failures_total", {"target": "offsite"}
        )
        or 0.0
    )
    with captured_logs(settings.model_copy(update={"log_format": "json"})) as lines:
        async with open_context(settings, Connections(settings)) as ctx:
            await ctx.store["tasks"].insert_many([{"_id": i} for i in range(100)])
            result = await backups.create(ctx)
        logged = lines()
    assert (Path(settings.backup_dir) / result.id / "manifest.json").is_file()
    assert {r.target: r.ok for r in result.replicated} == {"primary": True, "offsite": False}
    assert held(settings, "primary").fulls == {result.id}
    status = backup_replication.read_status(settings)["offsite"]
    assert status["failures"] == 1 and "last_ok" not in status and status["last_error"]
    assert (
        REGISTRY.get_sample_value(
            "taskmanager_backup_replication_failures_total", {"target": "offsite"}
        )
        == failures + 1
    )
    assert any(
        line["event"] == "backup.replication_failed" and line["target"] == "offsite"
        for line in logged
    ), logged
    assert aws_env["AWS_SECRET_ACCESS_KEY"] not in json.dumps(logged)

    offsite.start()  # the region is back (empty: the bucket is made again)
    try:
        offsite.bucket(bucket)
        [primary, caught_up] = await asyncio.to_thread(backup_replication.replicate, settings)
        assert primary.ok and primary.uploaded_fulls == []
        assert caught_up.ok and caught_up.uploaded_fulls == [result.id]
        assert held(settings, "offsite").fulls == {result.id}
        status = backup_replication.read_status(settings)["offsite"]
        assert status["last_ok"] >= status["last_failure"]
    finally:
        offsite.stop()


async def test_pruned_segments_are_no_gap_for_the_archiver(ctx: Context) -> None:
    """Retention deletes a chain's oldest segments: the archiver resumes from its newest one
    (``state.json`` names it) instead of taking the missing ones for a gap."""
    root = archive.archive_root(ctx.settings)
    chain = root / "20260101T000000Z-abcdef"
    chain.mkdir(parents=True)
    start, token = (100, 1), None
    for seq in range(1, 6):
        writer = archive.SegmentWriter(chain, chain.name, seq, start, token)
        token = {"_data": f"end{seq}"}
        seg = writer.close((start[0] + 2, 0), token, datetime.fromtimestamp(start[0] + 2, UTC))
        start = seg.end
    (root / "state.json").write_text(json.dumps({"chain": chain.name, "seq": 5}))
    for seg in archive.segments(chain)[:3]:
        seg.path.unlink()
    position = archive.Archiver(ctx, heal=False)._resume_point()
    assert position is not None and (position.chain, position.seq) == (chain.name, 5)
    assert position.token == {"_data": "end5"}
