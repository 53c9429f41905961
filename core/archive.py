"""Continuous archiving of change events, and point-in-time restore.

**The archiver** (``taskmanager archiver``, its own process, one leader at a time through a
Redis lock, :class:`Archiver`) follows a change stream on the configured database and writes
what it sees to ``BACKUP_DIR/archive/<chain>/`` as *segments*, at least every
``ARCHIVE_INTERVAL`` seconds (50 by default: with the time a segment takes to close and the
1 s margin it keeps, the largest loss window stays under 60 s, bench/dr.py): gzip'd lines of
canonical Extended JSON (types survive), the first line a header, then one change event per
line (its ``clusterTime`` and ``wallTime`` included), the last a trailer holding the stream's
resume token, the cluster time the segment covers to, its event count and the sha256 of
every line before it. A segment is written to a
``.tmp`` name, fsync'd, then renamed to ``<seq>_<from>_<to>.jsonl.gz`` (``from``/``to``: the
cluster times ``<seconds>.<increment>`` it covers), so a half-written one is never read: a
``.tmp`` left by a killed archiver is deleted when the next one starts, and that one resumes
from the token of the last complete segment (events after it are read again; none is lost or
kept twice). ``state.json`` repeats the newest segment's position; a state naming a segment that
is no longer there is a gap.

A *chain* is a run of contiguous segments (each starts where the previous one ended). A new
chain starts when there is none yet, or after a **gap**: the resume token no longer accepted
(``ChangeStreamHistoryLost``: the oplog rolled over while the archiver was down), an
``invalidate`` event (the database was dropped or renamed), a missing segment. A gap is logged
(``archive.gap``, error level) and healed at once by a full backup taken by the archiver, from
which the new chain can be replayed.

**Point-in-time restore** (:func:`restore_at`, ``backup restore --at T --into DB``): the newest
complete full backup consistent before ``T`` (its manifest records the cluster time at which its
reads began and ended, :func:`core.backup_format.operation_time`), plus the events of its chain
from shortly before the dump began up to ``T``. The dump is fuzzy (documents read at different
moments while writes went on); replaying every event from before its start makes it consistent,
because each event is applied idempotently: inserts and replaces as upserts of the whole
document by ``_id``, updates as ``$set``/``$unset`` of the values the event carries, deletes by
``_id``; an event already reflected in the dump changes nothing. Events up to the dump's end may
fail against a document the dump holds in a later shape: those are skipped; after it, any
failure stops the restore. An event belongs to the state at ``T`` when its ``wallTime`` (else
its cluster time) is at or before ``T``.

Everything is checked before anything is written: the full backup (:func:`core.restore.verify`)
and every segment needed (gzip header and CRC, the sha256 in its trailer, its event count, the
continuity of sequence numbers, cluster times and resume tokens); a corrupt or missing segment
is refused naming the file. The restore is built in a scratch database, then its collections are
renamed into the target (which must hold no data, or ``drop``), and the scratch one dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import os
import re
import secrets
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

from bson import json_util
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.timestamp import Timestamp
from pymongo import DeleteOne, ReplaceOne, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, OperationFailure, PyMongoError

from config.logging import get_logger
from config.settings import Settings
from core import backup_replication, cancel
from core import restore as restoring
from core.backup_format import (
    DIR_MODE,
    FILE_MODE,
    ID_RE,
    REPLAY_MARGIN,
    SKIP,
    data_collections,
    fsync_dir,
    operation_time,
    read_manifest,
    write_json_atomically,
)
from core.context import Context
from core.errors import Conflict, FieldError, Invalid
from core.store import Doc, Store, utcnow

log = get_logger(__name__)

ARCHIVE = "archive"
STATE = "state.json"
FORMAT = 1
SEGMENT_RE = re.compile(r"(\d{8})_(\d{1,12})\.(\d{1,10})_(\d{1,12})\.(\d{1,10})\.jsonl\.gz")
#: Resume failures meaning the stream cannot continue where it stopped: a gap.
GAP_CODES = frozenset({9, 260, 280, 286})
#: The gzip header every segment starts with (no name, mtime 0, level 6, OS unknown): checked
#: byte for byte, as gzip's own CRC does not cover it.
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
#: Dates outside Python's range are valid BSON (MongoDB stores them): they are read as DatetimeMS,
#: from the change stream and from segments alike, so one such event never stops the archive.
_JSON = json_util.JSONOptions(
    json_mode=json_util.JSONMode.CANONICAL,
    tz_aware=True,
    tzinfo=UTC,
    datetime_conversion=DatetimeConversion.DATETIME_AUTO,
)
_STREAM: CodecOptions[Doc] = CodecOptions(
    tz_aware=True, tzinfo=UTC, datetime_conversion=DatetimeConversion.DATETIME_AUTO
)

_TRAILER = b'{"kind": "trailer"'

#: ``progress(stage, done, total)``.
Progress = Callable[[str, int, int], None]


class Gap(Exception):
    """The change stream cannot continue from the archive's last position."""


class CorruptSegment(Invalid):
    """A segment that fails its checks, or a chain with a segment missing."""

    def __init__(self, file: str, problem: str):
        super().__init__(
            f"Archive segment {file}: {problem}", [FieldError(field="segment", message=problem)]
        )
        self.file = file


class NotRestorable(Invalid):
    """A moment the backups and the archive cannot restore."""

    def __init__(self, message: str):
        super().__init__(message, [FieldError(field="at", message=message)])


# -- Positions and names ---------------------------------------------------------------------


def ct_pair(ts: Timestamp) -> tuple[int, int]:
    """A cluster time as a sortable pair."""
    return (ts.time, ts.inc)


def ct_moment(pair: tuple[int, int]) -> datetime:
    """The wall-clock second of a cluster time."""
    return datetime.fromtimestamp(pair[0], UTC)


def archive_root(settings: Settings) -> Path:
    """``BACKUP_DIR/archive``."""
    return Path(settings.backup_dir) / ARCHIVE


def segment_name(seq: int, start: tuple[int, int], end: tuple[int, int]) -> str:
    """``<seq>_<from>_<to>.jsonl.gz``."""
    return f"{seq:08d}_{start[0]}.{start[1]}_{end[0]}.{end[1]}.jsonl.gz"


@dataclass(frozen=True)
class SegmentFile:
    """A complete segment as named on disk."""

    path: Path
    seq: int
    start: tuple[int, int]
    end: tuple[int, int]


def segments(chain_dir: Path) -> list[SegmentFile]:
    """The complete segments of a chain, by sequence number."""
    found = []
    for path in chain_dir.iterdir() if chain_dir.is_dir() else []:
        m = SEGMENT_RE.fullmatch(path.name)
        if m:
            a, b, c, d, e = (int(g) for g in m.groups())
            found.append(SegmentFile(path, a, (b, c), (d, e)))
    return sorted(found, key=lambda s: s.seq)


def chains(root: Path) -> list[Path]:
    """Chain directories, oldest first (their names sort by start time)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and ID_RE.fullmatch(p.name))


def _new_chain_id() -> str:
    return f"{utcnow():%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def _mkdir(path: Path) -> None:
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path, DIR_MODE)


# -- Writing segments ------------------------------------------------------------------------


class SegmentWriter:
    """One segment being written to its ``.tmp`` name (owner-only), hashed line by line."""

    def __init__(
        self,
        chain_dir: Path,
        chain: str,
        seq: int,
        start: tuple[int, int],
        prev_token: Any,
    ):
        self.chain_dir = chain_dir
        self.seq = seq
        self.start = start
        self.tmp = chain_dir / f"{seq:08d}.jsonl.gz.tmp"
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        os.fchmod(fd, FILE_MODE)
        self.file: IO[bytes] = os.fdopen(fd, "wb")
        self.gz = gzip.GzipFile(fileobj=self.file, mode="wb", compresslevel=6, mtime=0)
        self.sha = hashlib.sha256()
        self.events = 0
        self.last: tuple[int, int] = start
        self._line(
            {
                "kind": "header",
                "format": FORMAT,
                "chain": chain,
                "seq": seq,
                "from": list(start),
                "prev_token": prev_token,
            }
        )

    def _line(self, value: Any) -> None:
        data = json_util.dumps(value, json_options=_JSON).encode() + b"\n"
        self.sha.update(data)
        self.gz.write(data)

    def add(self, event: Doc) -> None:
        """Append one change event."""
        self._line(event)
        self.events += 1
        self.last = max(self.last, ct_pair(event["clusterTime"]))

    def close(self, end: tuple[int, int], token: Any, covered: datetime) -> SegmentFile:
        """Write the trailer, make the file durable, rename it to its final name. ``covered``:
        every event before that moment is in this segment or an earlier one."""
        end = max(end, self.last, self.start)
        trailer = {
            "kind": "trailer",
            "to": list(end),
            "covered": covered,
            "token": token,
            "events": self.events,
            "sha256": self.sha.hexdigest(),
        }
        self.gz.write(json_util.dumps(trailer, json_options=_JSON).encode() + b"\n")
        self.gz.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        final = self.chain_dir / segment_name(self.seq, self.start, end)
        os.replace(self.tmp, final)
        fsync_dir(self.chain_dir)
        return SegmentFile(final, self.seq, self.start, end)

    def abort(self) -> None:
        """Drop the unfinished segment."""
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()


# -- Reading and checking segments -----------------------------------------------------------


@dataclass
class SegmentContent:
    """What a checked segment holds."""

    header: dict[str, Any]
    trailer: dict[str, Any]
    events: int


def _lines(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as raw:
        if raw.read(len(GZIP_HEADER)) != GZIP_HEADER:
            raise ValueError("gzip header damaged")
        raw.seek(0)
        with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
            yield from gz


def _decode(line: bytes) -> Any:
    """One line's JSON; a damaged line raises ValueError whatever bson's decoder raised.

    A flipped bit inside a gzip member is only caught by its CRC at the member's end, so lines
    before it are decoded first: bson raises TypeError, InvalidBSON or OverflowError (a date out
    of range) on such lines, each a sign of the same damage.
    """
    try:
        return json_util.loads(line, json_options=_JSON)
    except Exception as exc:
        raise ValueError(f"a damaged line ({type(exc).__name__}: {exc})") from exc


def check_segment(seg: SegmentFile) -> SegmentContent:
    """Read a whole segment and check it; :class:`CorruptSegment` naming the file otherwise."""
    sha = hashlib.sha256()
    header: dict[str, Any] | None = None
    trailer: dict[str, Any] | None = None
    events = 0
    try:
        for line in _lines(seg.path):
            if trailer is not None:
                raise ValueError("lines after the trailer")
            if header is None:
                header = _decode(line)
                sha.update(line)
                continue
            if line.startswith(_TRAILER):
                trailer = _decode(line)
                continue
            sha.update(line)
            _decode(line)
            events += 1
    except (OSError, EOFError, ValueError, zlib.error, UnicodeDecodeError) as exc:
        raise CorruptSegment(seg.path.name, f"unreadable ({exc})") from exc
    if (
        not isinstance(header, dict)
        or header.get("kind") != "header"
        or header.get("format") != FORMAT
    ):
        raise CorruptSegment(seg.path.name, "no valid header")
    if trailer is None:
        raise CorruptSegment(seg.path.name, "no trailer: the segment is incomplete")
    if trailer.get("sha256") != sha.hexdigest():
        raise CorruptSegment(seg.path.name, "sha256 differs from its trailer")
    if trailer.get("events") != events:
        raise CorruptSegment(seg.path.name, f"{events} events, trailer says {trailer['events']}")
    if header.get("seq") != seg.seq or tuple(header.get("from", ())) != seg.start:
        raise CorruptSegment(seg.path.name, "header does not match the file name")
    if tuple(trailer.get("to", ())) != seg.end:
        raise CorruptSegment(seg.path.name, "trailer does not match the file name")
    return SegmentContent(header, trailer, events)


def _all_events(seg: SegmentFile) -> list[Doc]:
    return list(read_events(seg))


def read_events(seg: SegmentFile) -> Iterator[Doc]:
    """The change events of a (checked) segment, in order."""
    for i, line in enumerate(_lines(seg.path)):
        if i == 0 or line.startswith(_TRAILER):
            continue
        try:
            event: Doc = _decode(line)
        except ValueError as exc:  # changed since it was checked
            raise CorruptSegment(seg.path.name, str(exc)) from exc
        yield event


def check_chain(chain_dir: Path, wanted: list[SegmentFile]) -> list[SegmentContent]:
    """Check ``wanted`` (consecutive segments of one chain) and their continuity."""
    contents: list[SegmentContent] = []
    prev: tuple[SegmentFile, SegmentContent] | None = None
    for seg in wanted:
        if prev is not None and seg.seq != prev[0].seq + 1:
            raise CorruptSegment(
                f"{chain_dir.name}/{seg.seq - 1:08d}_*",
                f"missing: nothing between {prev[0].path.name} and {seg.path.name}",
            )
        content = check_segment(seg)
        if prev is not None and (
            seg.start != prev[0].end or content.header.get("prev_token") != prev[1].trailer["token"]
        ):
            raise CorruptSegment(seg.path.name, f"does not continue {prev[0].path.name}")
        contents.append(content)
        prev = (seg, content)
    return contents


# -- The archiver ----------------------------------------------------------------------------


@dataclass
class _Position:
    chain: str
    seq: int
    end: tuple[int, int]
    token: Any


class Archiver:
    """Follows the database's change stream into segments while it holds the leader lock."""

    def __init__(
        self,
        ctx: Context,
        *,
        interval: float | None = None,
        lock_ttl_ms: int = 15_000,
        heal: bool = True,
    ):
        from core.leader import LeaderLock

        self.ctx = ctx
        self.interval = interval or ctx.settings.archive_interval
        self.root = archive_root(ctx.settings)
        self.lock = LeaderLock(ctx.redis, ctx.key("archiver", "leader"), ttl_ms=lock_ttl_ms)
        self.heal = heal
        self.backups: set[asyncio.Task[Any]] = set()
        self.segments_written = 0
        self.lag_seconds = 0.0
        #: Unix time up to which the archive is complete (the newest segment's ``covered``).
        self.covered_until: float | None = None
        #: Gaps detected, and the Unix time of the last one (0: none); see core/archive_metrics.
        self.gaps = 0
        self.last_gap = 0.0
        #: An event read while closing a segment that belongs to the next one.
        self._carry: Doc | None = None
        #: The background copy of new segments to the remote targets (core.backup_replication).
        self._replicating: asyncio.Task[None] | None = None
        self._replicate_again = False

    async def run(self) -> None:
        """Follow while leading; retry after an error; release the lock when cancelled."""
        tick = self.lock.ttl_ms / 3000
        try:
            while True:
                if not await self.lock.tick():
                    await cancel.pause(tick)
                    continue
                follow = asyncio.create_task(self.follow(), name="archiver")
                try:
                    while not follow.done():
                        cancel.checkpoint()
                        await asyncio.wait({follow}, timeout=tick)
                        if not follow.done() and not await self.lock.tick():
                            log.warning("archive.leadership_lost")
                            break
                finally:
                    if not follow.done():
                        follow.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await follow
                if follow.done() and not follow.cancelled() and follow.exception() is not None:
                    log.error("archive.failed", error=repr(follow.exception()))
                    await cancel.pause(min(5.0, self.interval))
        finally:
            for task in self.backups:
                task.cancel()
            if self._replicating is not None:
                self._replicating.cancel()
            await self.lock.release()

    def _replicate_soon(self) -> None:
        """Copy new segments to the remote targets in the background, one run at a time (a
        segment closed meanwhile is taken by a run right after): a slow or unreachable target
        never holds the archive back."""
        settings = self.ctx.settings
        if not (settings.backup_target or settings.backup_offsite_target):
            return
        if self._replicating is not None and not self._replicating.done():
            self._replicate_again = True
            return
        self._replicating = asyncio.create_task(self._replicate(), name="archive-replication")

    async def _replicate(self) -> None:
        again = True
        while again:
            self._replicate_again = False
            try:
                # Failures of a target are logged and counted there; this is for the rest.
                await asyncio.to_thread(backup_replication.replicate, self.ctx.settings)
            except Exception as exc:
                log.error("archive.replication_failed", error=repr(exc))
            again = self._replicate_again

    def _resume_point(self) -> _Position | None:
        """Where the last complete segment ended (``None``: start a new chain); :class:`Gap`
        when ``state.json`` names a segment that is not there."""
        _mkdir(self.root)
        for chain_dir in chains(self.root):
            for tmp in chain_dir.glob("*.tmp"):
                log.info("archive.partial_segment_discarded", file=str(tmp))
                tmp.unlink()
        found = chains(self.root)
        if not found:
            return None
        chain_dir = found[-1]
        segs = segments(chain_dir)
        state = _read_state(self.root)
        # The newest sequence number, not the count: retention deletes a chain's oldest
        # segments (core.backup_replication.prune_local_segments).
        newest = segs[-1].seq if segs else 0
        if state and state.get("chain") == chain_dir.name and state["seq"] > newest:
            raise Gap(f"state.json names segment {state['seq']} of {chain_dir.name}: missing")
        if not segs:
            return None
        last = segs[-1]
        content = check_segment(last)
        return _Position(chain_dir.name, last.seq, last.end, content.trailer["token"])

    async def _start_chain(self, reason: str) -> _Position:
        now = await operation_time(self.ctx.store.db)
        if now is None:
            raise RuntimeError(
                "the server reports no cluster time: change streams need a replica set"
            )
        chain = _new_chain_id()
        await asyncio.to_thread(_mkdir, self.root / chain)
        log.info("archive.chain_started", chain=chain, reason=reason)
        if self.heal:
            task = asyncio.create_task(self._full_backup(chain, reason))
            self.backups.add(task)
            task.add_done_callback(self.backups.discard)
        return _Position(chain, 0, ct_pair(now), None)

    async def _full_backup(self, chain: str, reason: str) -> None:
        from core import backups

        try:
            result = await backups.create(self.ctx)
            log.info("archive.full_backup", chain=chain, reason=reason, backup_id=result.id)
        except Exception as exc:
            log.error("archive.full_backup_failed", chain=chain, error=repr(exc))

    async def follow(self) -> None:
        """Write segments until cancelled (a gap starts a new chain and heals it)."""
        try:
            position = await asyncio.to_thread(self._resume_point)
        except (Gap, CorruptSegment) as exc:
            log.error("archive.gap", reason=str(exc))
            self._gap()
            position = None
            reason = f"gap: {exc}"
        else:
            reason = "no archive yet"
        if position is None:
            position = await self._start_chain(reason)
        if self.covered_until is None:
            self.covered_until = float(position.end[0])
        while True:
            try:
                position = await self._follow_chain(position)
            except Gap as exc:
                log.error("archive.gap", chain=position.chain, reason=str(exc))
                self._gap()
                position = await self._start_chain(f"gap: {exc}")

    def _gap(self) -> None:
        self.gaps += 1
        self.last_gap = time.time()

    async def _open(self, position: _Position) -> Any:
        db = self.ctx.store.db.with_options(codec_options=_STREAM)
        options: dict[str, Any] = {"max_await_time_ms": 500, "batch_size": 1000}
        if position.token is not None:
            options["resume_after"] = position.token
        else:
            options["start_at_operation_time"] = Timestamp(*position.end)
        pipeline = [{"$match": {"ns.coll": {"$nin": sorted(SKIP)}}}]
        try:
            return await db.watch(pipeline, **options)
        except OperationFailure as exc:
            if position.token is not None and exc.code in GAP_CODES:
                why = exc.details and exc.details.get("errmsg")
                raise Gap(f"resume token refused ({exc.code}: {why})") from exc
            raise

    async def _follow_chain(self, position: _Position) -> _Position:
        chain_dir = self.root / position.chain
        self._carry = None
        stream = await self._open(position)
        try:
            while True:
                writer = await asyncio.to_thread(
                    SegmentWriter,
                    chain_dir,
                    position.chain,
                    position.seq + 1,
                    position.end,
                    position.token,
                )
                try:
                    position = await self._one_segment(stream, writer, position)
                except BaseException:
                    await asyncio.to_thread(writer.abort)
                    raise
        finally:
            await stream.close()

    async def _next(self, stream: Any) -> Doc | None:
        # Every read of the change stream passes here: the follower stops even when PyMongo
        # swallowed its cancellation (core/cancel.py), so run()'s wait for it ends.
        cancel.checkpoint()
        try:
            event: Doc | None = await stream.try_next()
        except OperationFailure as exc:
            if exc.code in GAP_CODES:
                raise Gap(f"change stream history lost ({exc.code})") from exc
            raise
        if event is not None and event.get("operationType") == "invalidate":
            raise Gap("invalidate event (the database was dropped or renamed)")
        return event

    async def _one_segment(
        self, stream: Any, writer: SegmentWriter, position: _Position
    ) -> _Position:
        opened = time.monotonic()
        if self._carry is not None:
            carried, self._carry = self._carry, None
            await asyncio.to_thread(writer.add, carried)
        while time.monotonic() - opened < self.interval:
            event = await self._next(stream)
            if event is not None:
                await asyncio.to_thread(writer.add, event)
        # Everything committed (majority) up to ``now`` is in the stream: drain it, then the
        # segment covers to ``now`` even when nothing happened.
        # The cluster time stands still while nothing is written: the wall clock (less a
        # second for clock skew) says up to when the segment is complete.
        covered = utcnow() - timedelta(seconds=1)
        now = await operation_time(self.ctx.store.db)
        # Drain up to ``now`` only: under steady writes the stream never runs dry. The first
        # event after ``now`` opens the next segment; the token stays the one before it.
        token = stream.resume_token
        while (event := await self._next(stream)) is not None:
            if now is not None and ct_pair(event["clusterTime"]) > ct_pair(now):
                self._carry = event
                break
            await asyncio.to_thread(writer.add, event)
            token = stream.resume_token
        else:
            token = stream.resume_token
        end = ct_pair(now) if now is not None else writer.last
        covered = max(covered, ct_moment(end))
        seg = await asyncio.to_thread(writer.close, end, token, covered)
        await asyncio.to_thread(
            write_json_atomically,
            self.root / STATE,
            {
                "chain": position.chain,
                "seq": seg.seq,
                "segment": seg.path.name,
                "to": list(seg.end),
                "token": json.loads(json_util.dumps(token, json_options=_JSON)),
                "written_at": utcnow().isoformat(),
            },
        )
        self.segments_written += 1
        self.covered_until = covered.timestamp()
        self.lag_seconds = max(0.0, time.time() - self.covered_until)
        log.info(
            "archive.segment",
            chain=position.chain,
            file=seg.path.name,
            events=writer.events,
            lag_seconds=round(self.lag_seconds, 1),
        )
        self._replicate_soon()
        return _Position(position.chain, seg.seq, seg.end, token)


def _read_state(root: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((root / STATE).read_text())
    except (OSError, ValueError):
        return None
    return data


# -- The restorable window -------------------------------------------------------------------


@dataclass(frozen=True)
class FullBackup:
    """A complete full backup usable for point-in-time restore."""

    id: str
    path: Path
    start: tuple[int, int]
    consistent: tuple[int, int]

    @property
    def restorable_from(self) -> datetime:
        """The first moment it can be restored to (the second after its reads ended)."""
        return ct_moment(self.consistent) + timedelta(seconds=1)


@dataclass(frozen=True)
class Chain:
    """A chain of segments on disk."""

    path: Path
    segments: list[SegmentFile]

    @property
    def start(self) -> tuple[int, int]:
        return self.segments[0].start

    def covered_until(self) -> datetime:
        """The last moment every event of which is in the chain (reads the last segment)."""
        covered: datetime = check_segment(self.segments[-1]).trailer["covered"]
        return covered


def full_backups(settings: Settings) -> list[FullBackup]:
    """Complete full backups that record their cluster times, oldest first."""
    from core.backups import scan

    found = []
    for b in scan(settings):
        ct = (b.manifest or {}).get("cluster_time")
        if b.complete and isinstance(ct, dict):
            start = (int(ct["start"][0]), int(ct["start"][1]))
            consistent = (int(ct["consistent"][0]), int(ct["consistent"][1]))
            found.append(FullBackup(b.id, b.path, start, consistent))
    return sorted(found, key=lambda b: b.consistent)


def archive_chains(settings: Settings) -> list[Chain]:
    """Chains holding at least one segment, oldest first."""
    out = []
    for path in chains(archive_root(settings)):
        segs = segments(path)
        if segs:
            out.append(Chain(path, segs))
    return out


@dataclass(frozen=True)
class Window:
    """A span of moments that can be restored."""

    backup: str
    chain: str
    start: datetime
    end: datetime


def windows(settings: Settings) -> list[Window]:
    """The restorable windows: from each chain's oldest usable full backup to its end."""
    out = []
    backups = full_backups(settings)
    for chain in archive_chains(settings):
        usable = [b for b in backups if b.start >= chain.start]
        if not usable:
            continue
        try:
            until = chain.covered_until()
        except CorruptSegment:
            continue
        first = usable[0]
        if first.restorable_from <= until:
            out.append(Window(first.id, chain.path.name, first.restorable_from, until))
    return out


# -- Point-in-time restore -------------------------------------------------------------------


@dataclass
class Plan:
    """What a restore to ``at`` uses."""

    at: datetime
    backup: FullBackup
    chain: Chain
    segments: list[SegmentFile]
    replay_from: tuple[int, int]
    events: int = 0


@dataclass
class PitrResult:
    """A finished point-in-time restore."""

    at: datetime
    database: str
    backup: str
    documents: int
    events_applied: int
    events_skipped: int
    segments: int
    seconds: float
    dropped: list[str] = field(default_factory=list)


def plan(settings: Settings, at: datetime, progress: Progress | None = None) -> Plan:
    """Choose the full backup and segments for ``at`` and check them all (blocking I/O);
    :class:`NotRestorable` or :class:`CorruptSegment` when they cannot give that moment."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    backups = full_backups(settings)
    if not backups:
        raise NotRestorable(
            f"no full backup in {settings.backup_dir} records the cluster times a "
            "point-in-time restore needs: take one (taskmanager backup create)"
        )
    oldest = min(backups, key=lambda b: b.restorable_from)
    candidates = [b for b in backups if b.restorable_from <= at]
    if not candidates:
        raise NotRestorable(
            f"{at.isoformat()} is before the oldest full backup ({oldest.id}, restorable from "
            f"{oldest.restorable_from.isoformat()}): that moment cannot be restored"
        )
    backup = max(candidates, key=lambda b: b.consistent)
    holding = [c for c in archive_chains(settings) if c.start <= backup.start]
    if not holding:
        raise NotRestorable(
            f"no archive chain covers full backup {backup.id}: was the archiver running?"
        )
    chain = holding[-1]
    replay_from = max(chain.start, (backup.start[0] - REPLAY_MARGIN, 0))
    wanted = [seg for seg in chain.segments if seg.end >= replay_from]
    if not wanted or wanted[0].start > replay_from:
        raise CorruptSegment(
            f"{chain.path.name}/", f"no segment holds the events from {replay_from} on"
        )
    # Check segment after segment (continuity included) until one covers ``at``.
    used: list[SegmentFile] = []
    events = 0
    covered: datetime | None = None
    for seg in wanted:
        content = check_chain(chain.path, [*used[-1:], seg])[-1]
        used.append(seg)
        events += content.events
        covered = content.trailer["covered"]
        if progress is not None:
            progress("check segments", len(used), len(wanted))
        if covered is not None and covered >= at and seg.end >= backup.consistent:
            return Plan(at, backup, chain, used, replay_from, events)
    raise NotRestorable(
        f"{at.isoformat()} is after the end of the archive chain {chain.path.name} (complete "
        f"until {covered.isoformat() if covered else '-'}): that is the newest moment "
        f"restorable from backup {backup.id}"
    )


def _included(event: Doc, plan_: Plan) -> bool:
    ct = ct_pair(event["clusterTime"])
    if ct < plan_.replay_from:
        return False
    if ct <= plan_.backup.consistent:
        return True
    wall = event.get("wallTime")
    moment = wall if isinstance(wall, datetime) else ct_moment(ct)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment <= plan_.at


def _write_op(event: Doc) -> Any | None:
    op = event["operationType"]
    key = {"_id": event["documentKey"]["_id"]}
    if op in ("insert", "replace"):
        return ReplaceOne(key, event["fullDocument"], upsert=True)
    if op == "delete":
        return DeleteOne(key)
    if op == "update":
        desc = event.get("updateDescription") or {}
        update: Doc = {}
        if desc.get("updatedFields"):
            update["$set"] = desc["updatedFields"]
        if desc.get("removedFields"):
            update["$unset"] = {f: "" for f in desc["removedFields"]}
        if desc.get("truncatedArrays"):
            update["$push"] = {
                t["field"]: {"$each": [], "$slice": t["newSize"]} for t in desc["truncatedArrays"]
            }
        return UpdateOne(key, update) if update else None
    return None


class _Replayer:
    """Applies change events to a database, batched per collection (order kept per
    collection, which is all that matters for documents keyed by ``_id``)."""

    def __init__(self, db: AsyncDatabase[Doc], consistent: tuple[int, int]):
        self.db = db
        self.consistent = consistent
        self.pending: dict[str, list[tuple[Any, tuple[int, int]]]] = {}
        self.applied = 0
        self.skipped = 0

    async def add(self, event: Doc) -> None:
        op = event["operationType"]
        coll = event.get("ns", {}).get("coll")
        if op in ("drop", "rename", "dropDatabase"):
            await self.flush()
            if op == "drop" and coll:
                await self.db.drop_collection(coll)
            elif op == "rename" and coll and event.get("to", {}).get("db") == event["ns"]["db"]:
                with contextlib.suppress(OperationFailure):
                    await self.db.client.admin.command(
                        "renameCollection",
                        f"{self.db.name}.{coll}",
                        to=f"{self.db.name}.{event['to']['coll']}",
                        dropTarget=True,
                    )
            elif op == "dropDatabase":
                for info in await data_collections(self.db):
                    await self.db.drop_collection(info["name"])
            self.applied += 1
            return
        write = _write_op(event) if coll else None
        if write is None:
            return
        batch = self.pending.setdefault(coll, [])
        batch.append((write, ct_pair(event["clusterTime"])))
        if len(batch) >= 1000:
            await self._flush(coll)

    async def flush(self) -> None:
        for coll in list(self.pending):
            await self._flush(coll)

    async def _flush(self, coll: str) -> None:
        batch = self.pending.pop(coll, [])
        while batch:
            try:
                await self.db[coll].bulk_write([w for w, _ in batch], ordered=True)
                self.applied += len(batch)
                return
            except BulkWriteError as exc:
                index = exc.details["writeErrors"][0]["index"]
                self.applied += index
                if batch[index][1] > self.consistent:
                    raise
                # Overlaps the dump: the document is there in a later shape already.
                self.skipped += 1
                batch = batch[index + 1 :]


def _scratch_name(into: str) -> str:
    return f"{into[:40]}_pitr_{secrets.token_hex(3)}"


async def restore_at(
    ctx: Context,
    at: datetime,
    into: str | None = None,
    *,
    drop: bool = False,
    progress: Progress | None = None,
) -> PitrResult:
    """Restore the database as it was at ``at`` into ``into`` (default ``MONGODB_DB``).

    Checks everything first, builds the result in a scratch database, then renames its
    collections into ``into``: a target holding data is refused (:class:`Conflict`) unless
    ``drop``, which drops its data collections (never the ``backups`` catalogue) just before.
    """
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    into = into or ctx.settings.mongodb_db
    client = ctx.store.client
    await restoring.refuse_occupied(ctx, into, drop=drop)
    started = time.monotonic()
    plan_ = await asyncio.to_thread(plan, ctx.settings, at, progress)
    scratch = _scratch_name(into)
    log.info(
        "archive.restore_started",
        at=at.isoformat(),
        backup=plan_.backup.id,
        segments=len(plan_.segments),
        scratch=scratch,
    )
    try:
        loaded = await restoring.restore(
            ctx,
            plan_.backup.id,
            database=scratch,
            progress=(lambda c, d, t: progress(f"load {c}", d, t)) if progress else None,
        )
        replayer = _Replayer(client[scratch], plan_.backup.consistent)
        seen = 0
        for seg in plan_.segments:
            events = await asyncio.to_thread(_all_events, seg)
            for event in events:
                seen += 1
                if _included(event, plan_):
                    await replayer.add(event)
            await replayer.flush()
            if progress is not None:
                progress("replay events", seen, plan_.events)
        dropped = await _switch(ctx, scratch, into, drop)
    except BaseException:
        with contextlib.suppress(PyMongoError):
            await client.drop_database(scratch)
        raise
    await client.drop_database(scratch)
    await Store(client, into).ensure_indexes()
    if into == ctx.settings.mongodb_db:
        await restoring._forget_cache(ctx)
    documents = sum((await restoring.occupied(ctx, into)).values())
    result = PitrResult(
        at=at,
        database=into,
        backup=plan_.backup.id,
        documents=documents,
        events_applied=replayer.applied,
        events_skipped=replayer.skipped,
        segments=len(plan_.segments),
        seconds=time.monotonic() - started,
        dropped=dropped,
    )
    log.info(
        "archive.restored",
        at=at.isoformat(),
        database=into,
        backup=plan_.backup.id,
        loaded=loaded.documents,
        events=replayer.applied,
        skipped=replayer.skipped,
        seconds=round(result.seconds, 2),
    )
    return result


async def _switch(ctx: Context, scratch: str, into: str, drop: bool) -> list[str]:
    """Move the scratch database's collections into ``into``."""
    client = ctx.store.client
    target = client[into]
    dropped = []
    if drop:
        for info in await data_collections(target):
            await target.drop_collection(info["name"])
            dropped.append(info["name"])
    elif await restoring.occupied(ctx, into):
        raise Conflict(f"Database {into!r} received data during the restore: not switched")
    for info in await data_collections(client[scratch]):
        await client.admin.command(
            "renameCollection",
            f"{scratch}.{info['name']}",
            to=f"{into}.{info['name']}",
            dropTarget=True,
        )
    return dropped


def parse_moment(value: str) -> datetime:
    """An ISO 8601 moment (``Z`` or an offset; none means UTC)."""
    moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def describe_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest of a full backup (for messages)."""
    return read_manifest(path)
