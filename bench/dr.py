"""Disaster recovery with real processes (``python -m bench dr``): RPO, RTO, archiver CPU.

One run, on loopback, bounded in time and stopping everything it started:

1. **Seed** ``--tasks`` tasks, each with its ``task.created`` event, shaped by the product's own
   code (``TaskCreate``, the derived sort keys, the event snapshot), inserted in bulk into a
   fresh SecantusDB, then the declared indexes built.
2. **Archive under steady writes**: ``taskmanager archiver`` starts (its own process, at its
   default ``ARCHIVE_INTERVAL`` unless ``--interval``) and, finding no archive, opens a chain and
   takes a full backup; meanwhile this process writes ``--rate`` task writes per second
   (creates, updates, deletes through ``core.tasks``, each a transaction with its events) and
   watches segments appear. After ``--rpo-seconds`` from the backup's end, plus a random part
   of one interval, the archiver is SIGKILLed and the source server stopped: the disaster.
3. **RPO**: the loss window at a moment ``t`` is ``t`` minus the newest restorable moment then
   (the "complete to" moment of the newest closed segment). Its largest value is read from the
   segment timeline (just before each close), its spread from 10,000 random moments, and one
   real kill is checked against what ``core.archive.windows`` says afterwards.
4. **RTO**: ``taskmanager backup restore --at <newest restorable moment>`` (a real process)
   into a fresh SecantusDB, the whole chain checked first, timed from start to exit; once per
   ``--concurrency`` value (each on its own fresh server), the restored task count checked
   against the writer's ledger.
5. **Archiver CPU** per 1,000 writes, from ``/proc/<pid>/stat`` over the steady phase (after
   its full backup).

Figures are of SecantusDB on this shared 2-core machine, not of mongod.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bson import ObjectId
from pymongo import AsyncMongoClient

from bench.api import task_body
from bench.procs import (
    Child,
    Services,
    clean_env,
    cpu_model,
    proc_cpu,
    publish,
    taskmanager_exe,
    write_json,
)
from cli.embedded import EmbeddedMongo
from config.connections import Connections
from config.settings import Settings
from core import archive, events, tasks
from core.context import Context, open_context
from core.task_models import TaskCreate

RESULTS = Path(__file__).resolve().parent / "results"
SECRET = "bench-dr-" + "s" * 48
#: The issue's targets.
RPO_TARGET = 60.0
RTO_TARGET_MINUTES = 10.0
RTO_TASKS = 100_000
OWNERS = 1000


@dataclass
class Options:
    """What to run."""

    tasks: int = RTO_TASKS
    rate: float = 20.0
    rpo_seconds: float = 200.0
    interval: float | None = None
    concurrency: tuple[int | None, ...] = (None, 1)
    seed: int | None = None
    timeout: float = 3600.0
    out: Path | None = RESULTS / "dr-latest.txt"
    json_out: Path | None = None


@dataclass
class Write:
    """One task write of the steady writer: when it was sent and acknowledged, and how it
    changed the number of tasks (+1 create, -1 delete, 0 update)."""

    start: datetime
    ack: datetime
    delta: int


@dataclass
class Seen:
    """A closed segment as the benchmark saw it: when it was written and what it covers."""

    name: str
    closed: float
    covered: float
    events: int


@dataclass
class Writer:
    """Task writes at a steady rate through ``core.tasks`` (several in flight at most)."""

    ctx: Context
    rate: float
    pool: list[tuple[str, str]]
    rng: random.Random
    ledger: list[Write] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    late: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Offer one write every ``1/rate`` s until ``stop``; waits for those in flight."""
        gate = asyncio.Semaphore(8)
        running: set[asyncio.Task[None]] = set()
        started = time.monotonic()
        k = 0
        while not stop.is_set():
            due = started + k / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                continue
            if gate.locked():
                self.late += 1
            await gate.acquire()
            task = asyncio.create_task(self._one(gate))
            running.add(task)
            task.add_done_callback(running.discard)
            k += 1
        if running:
            await asyncio.wait(running)

    async def _one(self, gate: asyncio.Semaphore) -> None:
        try:
            op = self.rng.random()
            start = datetime.now(UTC)
            if op < 0.4 or len(self.pool) < 10:
                owner = self.pool[self.rng.randrange(len(self.pool))][0] if self.pool else "u0"
                body = TaskCreate.model_validate(task_body(self.rng, start, len(self.ledger)))
                doc = await tasks.create(self.ctx, owner, body)
                self.pool.append((owner, str(doc["_id"])))
                delta = 1
            else:
                owner, task_id = self.pool.pop(self.rng.randrange(len(self.pool)))
                if op < 0.85:
                    changes = {
                        "priority": self.rng.choice(["low", "medium", "high", "urgent"]),
                        "status": self.rng.choice(["todo", "in_progress", "done"]),
                    }
                    await tasks.update(self.ctx, owner, task_id, changes, None)
                    self.pool.append((owner, task_id))
                    delta = 0
                else:
                    await tasks.delete(self.ctx, owner, task_id, None)
                    delta = -1
            self.ledger.append(Write(start, datetime.now(UTC), delta))
        except Exception as exc:
            name = type(exc).__name__
            self.errors[name] = self.errors.get(name, 0) + 1
        finally:
            gate.release()

    def tasks_at(self, seeded: int, moment: datetime) -> tuple[int, int]:
        """The fewest and most tasks the database can hold at ``moment``: the writes acknowledged
        by then count; those in flight then may or may not."""
        done = sum(w.delta for w in self.ledger if w.ack <= moment)
        flying = [w.delta for w in self.ledger if w.start <= moment < w.ack]
        low = seeded + done + sum(d for d in flying if d < 0)
        high = seeded + done + sum(d for d in flying if d > 0)
        return low, high


def seed_docs(
    rng: random.Random, owners: list[str], now: datetime, start: int, count: int, total: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``count`` stored tasks with their ``task.created`` events, as ``core.tasks.create``
    shapes them (created over the past ``total`` minutes, their events already relayed)."""
    docs, evs = [], []
    for i in range(start, start + count):
        owner = owners[i % len(owners)]
        fields = TaskCreate.model_validate(task_body(rng, now, i)).model_dump()
        created = now - timedelta(minutes=total - i)
        doc: dict[str, Any] = {
            "_id": ObjectId(),
            "owner": owner,
            **fields,
            "created_at": created,
            "updated_at": created,
            "version": 1,
            "completed_at": None,
        }
        doc.update(tasks._derived(fields, None, created))
        event = events.new_event(
            events.EventType.TASK_CREATED,
            user_id=owner,
            subject_id=str(doc["_id"]),
            data={"task": tasks._snapshot(doc)},
        )
        event["created_at"] = created
        del event["pending"]  # relayed long ago
        docs.append(doc)
        evs.append(event)
    return docs, evs


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class DrBench:
    """One run of the disaster-recovery benchmark."""

    def __init__(self, opts: Options):
        self.opts = opts
        self.rng = random.Random(opts.seed)
        self.results: dict[str, Any] = {"options": {}}
        self.lines: list[str] = []
        self.services: Services | None = None
        self.servers: list[EmbeddedMongo] = []
        self.backup_dir = Path(tempfile.mkdtemp(prefix="bench-dr-"))
        self.deadline = time.monotonic() + opts.timeout

    # ---- plumbing --------------------------------------------------------------------------

    def left(self, at_most: float) -> float:
        """Seconds to wait: ``at_most``, or what is left of the run's time budget."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"the run exceeded --timeout {self.opts.timeout:.0f} s")
        return min(at_most, remaining)

    def settings(self, mongo_url: str) -> Settings:
        """Settings of this run against ``mongo_url``."""
        assert self.services is not None
        values: dict[str, Any] = {
            "app_env": "production",
            "host": "127.0.0.1",
            "mongodb_url": mongo_url,
            "mongodb_db": self.services.db,
            "redis_url": self.services.redis_url,
            "redis_prefix": self.services.prefix,
            "jwt_secret": SECRET,
            "backup_dir": str(self.backup_dir),
            "log_level": "WARNING",
        }
        if self.opts.interval is not None:
            values["archive_interval"] = self.opts.interval
        return Settings(**values)

    def env(self, mongo_url: str, **extra: str) -> dict[str, str]:
        """The environment of a product process of this run."""
        assert self.services is not None
        values = {
            "APP_ENV": "production",
            "HOST": "127.0.0.1",
            "MONGODB_URL": mongo_url,
            "MONGODB_DB": self.services.db,
            "REDIS_URL": self.services.redis_url,
            "REDIS_PREFIX": self.services.prefix,
            "JWT_SECRET": SECRET,
            "BACKUP_DIR": str(self.backup_dir),
            "ARCHIVER_METRICS_PORT": "0",
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "INFO",
            **extra,
        }
        if self.opts.interval is not None:
            values["ARCHIVE_INTERVAL"] = f"{self.opts.interval:g}"
        return clean_env(**values)

    def note(self, text: str) -> None:
        """Progress on stderr (the report goes to stdout)."""
        print(f"[dr {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    # ---- the run ---------------------------------------------------------------------------

    def run(self) -> str:
        """Run everything; returns the report."""
        started = time.monotonic()
        self.results["started_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        self.results["load_average_start"] = os.getloadavg()[0]
        try:
            self.services = Services.start()
            asyncio.run(self.measure())
        finally:
            if self.services is not None:
                self.services.stop()
            for server in self.servers:
                server.stop()
            shutil.rmtree(self.backup_dir, ignore_errors=True)
        self.results["seconds"] = round(time.monotonic() - started, 1)
        self.results["load_average_end"] = os.getloadavg()[0]
        return self.report()

    async def measure(self) -> None:
        assert self.services is not None
        source = self.services.mongo
        self.results["redis_url"] = self.services.redis_url
        self.results["redis_prefix"] = self.services.prefix
        self.results["redis_private"] = self.services.private_redis is not None
        settings = self.settings(source.url)
        interval = settings.archive_interval
        self.results["interval"] = interval
        async with open_context(settings, Connections(settings)) as ctx:
            pool = await self.seed(ctx)
            archiver = self.services.spawn(
                "archiver", [taskmanager_exe(), "archiver"], self.env(source.url)
            )
            stop = asyncio.Event()
            writer = Writer(ctx, self.opts.rate, pool, self.rng)
            writing = asyncio.create_task(writer.run(stop))
            seen: list[Seen] = []
            watching = asyncio.create_task(self.watch(seen))
            try:
                backup_done = await self.wait_backup(settings, archiver)
                phase_start = time.time()
                cpu_start, writes_start = proc_cpu(archiver.pid), len(writer.ledger)
                extra = self.rng.uniform(0, interval)
                self.note(f"steady writes for {self.opts.rpo_seconds + extra:.0f} s, then SIGKILL")
                end = time.monotonic() + self.opts.rpo_seconds + extra
                while time.monotonic() < end:
                    await asyncio.sleep(self.left(min(1.0, end - time.monotonic())))
                    if not archiver.alive():
                        raise RuntimeError(f"the archiver exited:\n{archiver.output()}")
                cpu_end, writes_end = proc_cpu(archiver.pid), len(writer.ledger)
                killed_at = time.time()
                archiver.popen.send_signal(signal.SIGKILL)
                archiver.popen.wait(10)
            finally:
                stop.set()
                await writing
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watching
        source.stop()
        writes = writes_end - writes_start
        self.results["writes"] = {
            "offered_rate": self.opts.rate,
            "acknowledged": len(writer.ledger),
            "in_phase": writes,
            "phase_seconds": round(killed_at - phase_start, 1),
            "rate": round(writes / max(killed_at - phase_start, 1e-9), 2),
            "errors": writer.errors,
            "late_offers": writer.late,
        }
        self.results["cpu"] = {
            "archiver_seconds": round(cpu_end - cpu_start, 3),
            "per_1000_writes": round((cpu_end - cpu_start) / max(writes, 1) * 1000, 3),
        }
        moment = self.rpo(seen, backup_done, phase_start, killed_at)
        expected = writer.tasks_at(self.opts.tasks, moment)
        self.results["rto"] = [
            await self.restore(moment, c, expected) for c in self.opts.concurrency
        ]

    async def seed(self, ctx: Context) -> list[tuple[str, str]]:
        """Insert the tasks and events in bulk, then build the declared indexes; returns
        (owner, task id) of a sample the writer updates and deletes."""
        n = self.opts.tasks
        owners = [str(ObjectId()) for _ in range(OWNERS)]
        now = datetime.now(UTC)
        started = time.monotonic()
        pool: list[tuple[str, str]] = []
        for start in range(0, n, 1000):
            docs, evs = seed_docs(self.rng, owners, now, start, min(1000, n - start), n)
            await ctx.store["tasks"].insert_many(docs, ordered=False)
            await ctx.store["events"].insert_many(evs, ordered=False)
            pool += [(d["owner"], str(d["_id"])) for d in docs[:50]]
            if start % 20_000 == 0:
                self.note(f"seeded {start + len(docs)} of {n} tasks")
            self.left(1)
        await ctx.store.ensure_indexes()
        self.results["seed"] = {
            "tasks": n,
            "events": n,
            "seconds": round(time.monotonic() - started, 1),
        }
        self.note(f"seeded {n} tasks and events in {time.monotonic() - started:.0f} s")
        return pool

    async def wait_backup(self, settings: Settings, archiver: Child) -> float:
        """Wait for the full backup the archiver takes when it finds no archive; returns when
        it finished (Unix time)."""
        started = time.monotonic()
        while True:
            found = await asyncio.to_thread(archive.full_backups, settings)
            if found:
                break
            if not archiver.alive():
                raise RuntimeError(f"the archiver exited:\n{archiver.output()}")
            await asyncio.sleep(self.left(0.5))
        manifest = json.loads((found[0].path / "manifest.json").read_text())
        self.results["full_backup"] = {
            "id": found[0].id,
            "documents": manifest["documents"],
            "bytes": manifest["bytes"],
            "read_mode": manifest["read_mode"],
            "seconds": round(time.monotonic() - started, 1),
        }
        self.note(f"the archiver's full backup {found[0].id} is complete")
        return time.time()

    async def watch(self, seen: list[Seen]) -> None:
        """Record every segment when it appears: written when, complete to when."""
        root = self.backup_dir / archive.ARCHIVE
        known: set[str] = set()
        while True:
            for chain in await asyncio.to_thread(archive.chains, root):
                for seg in await asyncio.to_thread(archive.segments, chain):
                    if seg.path.name in known:
                        continue
                    known.add(seg.path.name)
                    content = await asyncio.to_thread(archive.check_segment, seg)
                    seen.append(
                        Seen(
                            seg.path.name,
                            seg.path.stat().st_mtime,
                            content.trailer["covered"].timestamp(),
                            content.events,
                        )
                    )
            await asyncio.sleep(0.2)

    def rpo(self, seen: list[Seen], backup_done: float, start: float, killed: float) -> datetime:
        """Loss windows from the segment timeline; returns the newest restorable moment after
        the kill, as ``core.archive.windows`` reads it from the files."""
        assert self.services is not None
        settings = self.settings(self.services.mongo.url)
        [window] = archive.windows(settings)[-1:]
        # Segments that give a restorable moment: complete to a moment after the full backup.
        valid = sorted(
            (s for s in seen if s.covered >= window.start.timestamp()), key=lambda s: s.closed
        )
        if not valid:
            raise RuntimeError("no segment closed after the full backup: run longer")
        # The loss at t is t minus the "complete to" moment of the newest segment closed by
        # then: largest just before the next segment closes, and at the kill.
        just_before = [b.closed - a.covered for a, b in itertools.pairwise(valid)]
        just_before.append(killed - valid[-1].covered)
        samples = []
        for _ in range(10_000):
            t = self.rng.uniform(valid[0].closed, killed)
            samples.append(t - max(s.covered for s in valid if s.closed <= t))
        closes = [s for s in seen if s.closed >= backup_done]
        gaps = [b.closed - a.closed for a, b in itertools.pairwise(valid)]
        self.results["rpo"] = {
            "segments_in_phase": len(closes),
            "events_in_phase": sum(s.events for s in closes),
            "close_every_seconds": round(statistics.median(gaps), 2) if gaps else None,
            "largest_loss_seconds": round(max(just_before), 2),
            "loss_before_each_close": [round(x, 2) for x in just_before],
            "random_kill_loss_seconds": {
                "median": round(statistics.median(samples), 2),
                "p95": round(percentile(samples, 0.95), 2),
                "max": round(max(samples), 2),
            },
            "real_kill_loss_seconds": round(killed - window.end.timestamp(), 2),
            "newest_restorable": window.end.isoformat(),
            "restorable_from": window.start.isoformat(),
            "segments": [s.__dict__ for s in seen],
        }
        return window.end

    async def restore(
        self, moment: datetime, concurrency: int | None, expected: tuple[int, int]
    ) -> dict[str, Any]:
        """``taskmanager backup restore --at moment`` into a fresh server; timed, checked."""
        assert self.services is not None
        target = EmbeddedMongo(":memory:").start()
        self.servers.append(target)
        # SecantusDB runs one operation at a time: while it copies a collection for the
        # switch (renameCollection) it answers no heartbeat, and PyMongo cancels operations
        # in flight when a heartbeat times out. A longer timeout keeps the restore going.
        extra = {"MONGODB_TIMEOUT_MS": "120000"}
        if concurrency is not None:
            extra["RESTORE_CONCURRENCY"] = str(concurrency)
        used = concurrency or Settings.model_fields["restore_concurrency"].default
        self.note(f"restore --at {moment.isoformat()} at concurrency {used}")
        load = os.getloadavg()[0]
        started = time.monotonic()
        proc = await asyncio.to_thread(
            subprocess.run,
            [taskmanager_exe(), "backup", "restore", "--at", moment.isoformat(), "--yes"],
            env=self.env(target.url, **extra),
            capture_output=True,
            text=True,
            timeout=self.left(max(600.0, self.opts.tasks / 50)),
        )
        seconds = time.monotonic() - started
        if proc.returncode != 0:
            raise RuntimeError(f"restore failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
        logs = {}
        for line in (proc.stdout + proc.stderr).splitlines():
            # Progress bars share stderr with the JSON log lines (a bar may precede one).
            with contextlib.suppress(ValueError):
                entry = json.loads(line[line.find("{") :])
                if isinstance(entry, dict) and entry.get("event") in (
                    "backup.restored",
                    "archive.restored",
                ):
                    logs[entry["event"]] = entry
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(target.url)
        try:
            db = client[self.services.db]
            restored_tasks = await db["tasks"].count_documents({})
            documents = 0
            for name in await db.list_collection_names():
                documents += await db[name].count_documents({})
            indexes = len(await db["tasks"].index_information())
        finally:
            await client.close()
        assert target.process is not None
        server_cpu = proc_cpu(target.process.pid)
        target.stop()
        loaded = logs.get("backup.restored", {})
        replayed = logs.get("archive.restored", {})
        return {
            "concurrency": used,
            "seconds": round(seconds, 1),
            # The fresh server's CPU from its start through the restore and the counts after
            # it, all its threads (WiredTiger's included): less disturbed by the machine's load
            # than the wall time.
            "server_cpu_seconds": round(server_cpu, 1),
            "load_average": round(load, 1),
            "documents": documents,
            "docs_per_second": round(documents / seconds),
            "load_seconds": loaded.get("seconds"),
            "index_seconds": loaded.get("index_seconds"),
            "loaded_documents": loaded.get("documents"),
            "events_applied": replayed.get("events"),
            "events_skipped": replayed.get("skipped"),
            "tasks": restored_tasks,
            "tasks_expected": list(expected),
            "tasks_match": expected[0] <= restored_tasks <= expected[1],
            "task_indexes": indexes,
            "stdout": proc.stdout.strip().splitlines()[-1:],
        }

    # ---- the report ------------------------------------------------------------------------

    def report(self) -> str:
        r = self.results
        w, cpu, rpo, seed = r["writes"], r["cpu"], r["rpo"], r["seed"]
        best = min(r["rto"], key=lambda x: x["seconds"])
        per_100k = best["seconds"] / 60 * RTO_TASKS / seed["tasks"]
        default_interval = r["interval"] == Settings.model_fields["archive_interval"].default
        out = [
            "Disaster recovery (python -m bench dr): RPO, RTO and the archiver's CPU, real "
            "processes, one run",
            f"  when      {r['started_at']}, {r['seconds']:.0f} s in all",
            f"  machine   {os.cpu_count()} cores ({cpu_model()}), Linux, Python "
            f"{sys.version.split()[0]}, PyMongo {version('pymongo')}",
            f"  load      1-min load average {r['load_average_start']:.1f} at start, "
            f"{r['load_average_end']:.1f} at end (a shared machine: other work competes)",
            f"  services  SecantusDB {version('SecantusDB')} in memory (embedded), a fresh one per "
            "restore; Redis (for the archiver's leader lock)",
            "",
            f"1. Seed: {seed['tasks']} tasks + {seed['events']} task.created events in bulk, "
            f"indexes built, {seed['seconds']:.0f} s",
            f"   full backup by the archiver at start: {r['full_backup']['documents']} documents, "
            f"{r['full_backup']['bytes'] / 1e6:.1f} MB gzip, {r['full_backup']['read_mode']} "
            f"reads, ready {r['full_backup']['seconds']:.0f} s after the archiver started",
            "",
            f"2. Steady writes: {w['offered_rate']:g}/s offered (40 % create, 45 % update, 15 % "
            "delete, each a transaction with its events, through core.tasks)",
            f"   {w['in_phase']} writes in {w['phase_seconds']:.0f} s after the backup "
            f"({w['rate']:.1f}/s achieved), {w['acknowledged']} in all; errors "
            f"{w['errors'] or 'none'}",
            "",
            f"3. RPO at ARCHIVE_INTERVAL={r['interval']:g} s: the loss window is how old the "
            "newest restorable moment is when everything is lost",
            f"   {rpo['segments_in_phase']} segments closed after the backup "
            f"(one every {rpo['close_every_seconds']} s), {rpo['events_in_phase']} change events",
            "   largest loss window (just before a segment closes)  "
            f"{rpo['largest_loss_seconds']:7.1f} s",
            f"   10,000 random kill moments: median {rpo['random_kill_loss_seconds']['median']} s, "
            f"p95 {rpo['random_kill_loss_seconds']['p95']} s, max "
            f"{rpo['random_kill_loss_seconds']['max']} s",
            f"   one real SIGKILL of the archiver at a random moment: newest restorable moment "
            f"{rpo['real_kill_loss_seconds']:.1f} s before it (backup list / verify --at agree)",
            "",
            "4. RTO: taskmanager backup restore --at <newest restorable moment> into a fresh "
            "server (chain checked, full backup loaded, events replayed, switched), wall time",
            "   load s: the full backup loaded (inserts + index builds); server CPU: SecantusDB's "
            "CPU seconds meanwhile; load: the machine's 1-min load average at the start",
            "   concurrency  seconds  documents  docs/s  server CPU  load   load s  index s  "
            "events  tasks ok",
        ]
        for x in r["rto"]:
            out.append(
                f"   {x['concurrency']:>11}  {x['seconds']:7.1f}  {x['documents']:9d}  "
                f"{x['docs_per_second']:6d}  {x['server_cpu_seconds']:10.1f}  "
                f"{x['load_average']:4.1f}  {x['load_seconds'] or 0:7.1f}  "
                f"{x['index_seconds'] or 0:7.1f}  {x['events_applied'] or 0:6d}  "
                f"{'yes' if x['tasks_match'] else 'NO'} ({x['tasks']} tasks, ledger "
                f"{x['tasks_expected'][0]}..{x['tasks_expected'][1]})"
            )
        scaled = (
            ""
            if seed["tasks"] == RTO_TASKS
            else f" (measured at {seed['tasks']} tasks, scaled linearly)"
        )
        out += [
            f"   per 100k tasks with their events: {per_100k:.1f} min{scaled}",
            "",
            "5. Archiver CPU over the steady phase (after its full backup), from /proc/<pid>/stat",
            f"   {cpu['archiver_seconds']:.2f} CPU s for {w['in_phase']} writes: "
            f"{cpu['per_1000_writes']:.2f} CPU s per 1,000 writes",
            "",
            "6. Targets",
            _target(
                f"RPO <= {RPO_TARGET:g} s at the default interval",
                f"{rpo['largest_loss_seconds']:.1f} s",
                rpo["largest_loss_seconds"] <= RPO_TARGET if default_interval else None,
            ),
            _target(
                f"RTO <= {RTO_TARGET_MINUTES:g} min per 100k tasks with their events",
                f"{per_100k:.1f} min",
                per_100k <= RTO_TARGET_MINUTES,
            ),
            _target(
                "restore docs/s above the 550/s measured before issue 10",
                f"{best['docs_per_second']}/s",
                best["docs_per_second"] > 550,
            ),
            _target(
                "restored task count as the writer's ledger says",
                "all" if all(x["tasks_match"] for x in r["rto"]) else "NOT all",
                all(x["tasks_match"] for x in r["rto"]),
            ),
        ]
        if not default_interval:
            out.append(f"   (ARCHIVE_INTERVAL={r['interval']:g} s, not the default: a short run)")
        return "\n".join(out) + "\n"


def _target(what: str, value: str, ok: bool | None) -> str:
    verdict = "n/a" if ok is None else "PASS" if ok else "MISS"
    return f"   {what:<58} {value:>10}  {verdict}"


def parse(argv: list[str]) -> Options:
    """Command-line options."""
    ap = argparse.ArgumentParser(prog="python -m bench dr", description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=RTO_TASKS, help="tasks seeded (each + an event)")
    ap.add_argument("--rate", type=float, default=20.0, help="task writes/s offered")
    ap.add_argument(
        "--rpo-seconds",
        type=float,
        default=200.0,
        help="steady writes after the full backup, before the kill (plus 0..1 interval)",
    )
    ap.add_argument(
        "--interval", type=float, default=None, help="ARCHIVE_INTERVAL (default: the product's)"
    )
    ap.add_argument(
        "--concurrency",
        default="default,1",
        help="RESTORE_CONCURRENCY of each timed restore ('default': the product's)",
    )
    ap.add_argument("--seed", type=int, default=None, help="random seed (kill moment, writes)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="give up after this many s")
    ap.add_argument(
        "--out", type=Path, default=RESULTS / "dr-latest.txt", help="report ('-': none)"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    ns = ap.parse_args(argv)
    levels: list[int | None] = []
    for item in ns.concurrency.split(","):
        if not re.fullmatch(r"default|[1-9]\d?", item.strip()):
            ap.error(f"--concurrency: {item!r} is neither 'default' nor 1..99")
        levels.append(None if item.strip() == "default" else int(item))
    if ns.tasks < 100 or ns.rate <= 0 or ns.rpo_seconds <= 0:
        ap.error("--tasks >= 100, --rate > 0, --rpo-seconds > 0")
    return Options(
        tasks=ns.tasks,
        rate=ns.rate,
        rpo_seconds=ns.rpo_seconds,
        interval=ns.interval,
        concurrency=tuple(levels),
        seed=ns.seed if ns.seed is not None else secrets.randbelow(2**31),
        timeout=ns.timeout,
        out=None if str(ns.out) == "-" else ns.out,
        json_out=ns.json,
    )


def main(argv: list[str]) -> int:
    """Run the benchmark; print the report and write it to the results file."""
    opts = parse(argv)
    bench = DrBench(opts)
    report = bench.run()
    publish(report, opts.out)
    if opts.json_out is not None:
        bench.results["options"] = {
            "tasks": opts.tasks,
            "rate": opts.rate,
            "rpo_seconds": opts.rpo_seconds,
            "interval": opts.interval,
            "seed": opts.seed,
        }
        write_json(opts.json_out, json.dumps(bench.results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
