"""The archiver (in-process) and point-in-time restore over a local archive."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import stat
import urllib.request
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from bson.datetime_ms import DatetimeMS
from bson.timestamp import Timestamp
from prometheus_client.parser import text_string_to_metric_families

from config.connections import Connections
from core import archive, archive_metrics, backups
from core.archive import CorruptSegment, NotRestorable, SegmentWriter
from core.context import Context, open_context


def _event(t: int, i: int, n: int) -> dict[str, Any]:
    return {
        "_id": {"_data": f"tok{n}"},
        "operationType": "insert",
        "clusterTime": Timestamp(t, i),
        "ns": {"db": "d", "coll": "c"},
        "documentKey": {"_id": n},
        "fullDocument": {"_id": n, "v": n},
    }


def _chain(tmp_path: Path, count: int = 3) -> list[archive.SegmentFile]:
    chain = tmp_path / "20260101T000000Z-abcdef"
    chain.mkdir()
    out, start, token = [], (100, 1), None
    for seq in range(1, count + 1):
        w = SegmentWriter(chain, chain.name, seq, start, token)
        w.add(_event(start[0] + 1, 1, seq))
        token = {"_data": f"end{seq}"}
        seg = w.close((start[0] + 2, 0), token, datetime.fromtimestamp(start[0] + 2, UTC))
        out.append(seg)
        start = seg.end
    return out


def test_segments_round_trip_and_are_owner_only(tmp_path: Path) -> None:
    segs = _chain(tmp_path)
    contents = archive.check_chain(segs[0].path.parent, segs)
    assert [c.events for c in contents] == [1, 1, 1]
    assert [e["documentKey"]["_id"] for e in archive.read_events(segs[1])] == [2]
    assert stat.S_IMODE(segs[0].path.stat().st_mode) == 0o600
    assert not list(segs[0].path.parent.glob("*.tmp"))


def test_every_flipped_bit_is_refused_naming_the_file(tmp_path: Path) -> None:
    """Each byte of a segment holding dates, flipped in its low, middle and high bit, is refused
    unless the segment still holds the same lines (deflate ignores its final byte's padding bits).

    Replays a CI failure: a flip in the deflate data decoded into a date out of range before the
    gzip CRC at the member's end was read, and restore ended in bson's OverflowError traceback.
    """
    chain = tmp_path / "20260101T000000Z-abcdef"
    chain.mkdir()
    w = SegmentWriter(chain, chain.name, 1, (100, 1), None)
    for n in range(20):
        event = _event(101, n + 1, n)
        event["fullDocument"]["at"] = datetime(2026, 12, 1, 4, 56, n, tzinfo=UTC)
        w.add(event)
    seg = w.close((102, 0), {"_data": "end"}, datetime.fromtimestamp(102, UTC))
    original = seg.path.read_bytes()
    lines = gzip.decompress(original)
    accepted, other = [], []
    for offset in range(len(original)):
        for mask in (0x01, 0x10, 0x80):
            data = bytearray(original)
            data[offset] ^= mask
            seg.path.write_bytes(bytes(data))
            try:
                archive.check_segment(seg)
                if gzip.decompress(data) != lines:
                    accepted.append((offset, mask))
            except CorruptSegment as exc:
                if seg.path.name not in exc.detail:
                    other.append((offset, mask, exc.detail))
            except Exception as exc:  # what the test is for: anything but CorruptSegment
                other.append((offset, mask, repr(exc)))
    assert (accepted, other) == ([], [])
    seg.path.write_bytes(original)
    assert archive.check_segment(seg).events == 20


def test_a_header_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    [seg, *_] = _chain(tmp_path, 1)
    lines = gzip.decompress(seg.path.read_bytes()).splitlines(keepends=True)
    raw = io.BytesIO()  # written as the archiver writes (no file name in the gzip header)
    with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz:
        gz.write(b"[1]\n" + b"".join(lines[1:]))
    seg.path.write_bytes(raw.getvalue())
    with pytest.raises(CorruptSegment, match="no valid header"):
        archive.check_segment(seg)


def test_dates_outside_pythons_range_round_trip(tmp_path: Path) -> None:
    """Valid BSON dates Python cannot hold (MongoDB stores them; the test server refuses them on
    insert, so this runs on the segment format alone) are archived and read back, not refused."""
    chain = tmp_path / "20260101T000000Z-abcdef"
    chain.mkdir()
    w = SegmentWriter(chain, chain.name, 1, (100, 1), None)
    event = _event(101, 1, 1)
    event["fullDocument"]["far"] = DatetimeMS(2**62)
    event["fullDocument"]["bc"] = DatetimeMS(-(2**62))
    event["fullDocument"]["now"] = datetime(2026, 12, 1, tzinfo=UTC)
    w.add(event)
    seg = w.close((102, 0), {"_data": "end"}, datetime.fromtimestamp(102, UTC))
    assert archive.check_segment(seg).events == 1
    [back] = archive.read_events(seg)
    assert back["fullDocument"] == event["fullDocument"]


def test_a_missing_segment_is_refused(tmp_path: Path) -> None:
    segs = _chain(tmp_path)
    segs[1].path.unlink()
    with pytest.raises(CorruptSegment) as err:
        archive.check_chain(segs[0].path.parent, [segs[0], segs[2]])
    assert "missing" in err.value.detail and segs[2].path.name in err.value.detail


def test_an_unfinished_segment_is_never_listed(tmp_path: Path) -> None:
    chain = tmp_path / "20260101T000000Z-abcdef"
    chain.mkdir()
    w = SegmentWriter(chain, chain.name, 1, (1, 1), None)
    w.add(_event(2, 1, 1))
    try:
        assert archive.segments(chain) == []
    finally:
        w.abort()
    assert not list(chain.iterdir())


async def _state(db: Any) -> dict[Any, Any]:
    return {d["_id"]: d async for d in db["items"].find({})}


@pytest.fixture
async def ctx(make_settings: Any, tmp_path: Path) -> AsyncIterator[Context]:
    """A context whose BACKUP_DIR is the test's own."""
    settings = make_settings(backup_dir=str(tmp_path / "backups"))
    async with open_context(settings, Connections(settings)) as ctx:
        yield ctx


async def test_archiver_then_restore_to_a_moment(ctx: Context) -> None:
    db = ctx.store.db
    await db["items"].insert_many([{"_id": i, "v": 0} for i in range(20)])
    arch = archive.Archiver(ctx, interval=0.5, lock_ttl_ms=3000, heal=False)
    task = asyncio.create_task(arch.run())
    try:
        while arch.segments_written < 1:
            await asyncio.sleep(0.1)
        await backups.create(ctx)
        for i in range(20):
            await db["items"].update_one({"_id": i}, {"$set": {"v": 1}, "$unset": {"x": ""}})
        await db["items"].delete_one({"_id": 0})
        await db["items"].insert_one({"_id": 100, "v": 1})
        await asyncio.sleep(1.2)
        moment = datetime.now(UTC)
        expected = await _state(db)
        await asyncio.sleep(1.2)
        await db["items"].update_many({}, {"$set": {"v": 2}})
        await db["items"].delete_one({"_id": 5})
        await asyncio.sleep(0.2)
        end = datetime.now(UTC)
        written = arch.segments_written
        while arch.segments_written < written + 3:
            await asyncio.sleep(0.1)
        await _check_metrics(arch)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    [window] = archive.windows(ctx.settings)
    assert window.start <= moment <= end <= window.end
    into = ctx.settings.mongodb_db + "_r"
    try:
        result = await archive.restore_at(ctx, moment, into)
        assert await _state(ctx.store.client[into]) == expected
        assert result.events_applied >= 22
        latest = await archive.restore_at(ctx, end, into, drop=True)
        assert await _state(ctx.store.client[into]) == await _state(db)
        assert latest.database == into
        with pytest.raises(NotRestorable, match="before the oldest full backup"):
            await archive.restore_at(ctx, moment - timedelta(hours=1), into, drop=True)
    finally:
        await ctx.store.client.drop_database(into)


async def _check_metrics(arch: archive.Archiver) -> None:
    """The leader's lag is small while it writes segments; its endpoint serves the families."""
    server = await asyncio.to_thread(archive_metrics.serve, arch, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
    finally:
        await asyncio.to_thread(server.shutdown)
        server.server_close()
    samples = {
        s.name: s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    assert set(archive_metrics.NAMES) <= samples.keys()
    assert 0 <= samples["taskmanager_archive_lag_seconds"] < 5
    assert samples["taskmanager_archive_leader"] == 1
    assert samples["taskmanager_archive_segments_written_total"] == arch.segments_written
    assert samples["taskmanager_archive_gaps_total"] == 0
    assert samples["taskmanager_archive_last_gap_timestamp_seconds"] == 0
