"""The worker benchmark: no-op throughput of our broker set-up beside bare Dramatiq, and events
through the real actors at a steady write rate, all measured in one run.

What runs (all on loopback, all started and stopped here):

* SecantusDB in memory, and Redis (the machine's on 6379 under a unique key prefix, else a
  private ``redis-server``); every key written is deleted at the end;
* **no-op throughput**: for each variant a queue is filled with N messages from this process,
  then ONE worker process drains it (``dramatiq bench.worker_noop:broker --processes 1
  --threads 8``): bare Dramatiq (a plain ``RedisBroker`` and a plain sync no-op), and our
  set-up (``workers.broker.build_broker``: AsyncIO, MessageContext, resources, heartbeats,
  dead-letter notes, every actor of ours declared, our actor defaults) with a sync and an
  async no-op (the sync one separates our middleware's cost from the async actor's). Variants
  are interleaved over rounds, each round in a fresh namespace, and the median is reported,
  so slow drift of a shared machine hits them alike. The rate is taken from Redis: the time
  from 10 % to 90 % of the messages acknowledged (the whole drain is shown too);
* **events**: a real ``taskmanager web`` and a real ``taskmanager worker --processes 1
  --threads 8`` (production settings), a webhook receiver in this process, a user with a
  webhook on ``task.created``; tasks are created open loop at a steady rate (sends are
  scheduled at fixed times, never waiting for answers), each titled with a unique word and a
  word shared by the tasks of its 250 ms slot. Per task: the write's acknowledgement → the
  first ``GET /search?q=<slot word>`` that returns it (pollers cycle through the slots with
  pending tasks, so polling costs one search per slot rather than one per task) and → the
  webhook delivery received. MongoDB's own timestamps give the server-side breakdown (relay
  enqueue, index entry, analytics fold, delivery). Before the measured run at the target rate,
  a ladder of short steps at rising rates finds the highest rate at which the targets hold;
  every run starts from a fresh worker and empty queues.

Targets (reported, never asserted): no-op throughput through our set-up ≥ 90 % of bare
Dramatiq; at a steady 200 writes/s, write → searchable p95 ≤ 1 s and write → webhook received
p95 ≤ 2 s; the worker process ≤ 100 MB RSS (``bench/worker_imports.py`` shows where it goes).
When a target is missed (or with ``--profile always``) the worker is run again, instrumented
by :mod:`bench.worker_profile` (per-actor run and queue-wait times, MongoDB round trips, CPU by
thread, and a cProfile): the no-op variants, and the events at the first ladder rate that
missed, where the worker falls behind while the web still keeps up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import pstats
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from bson import ObjectId
from pymongo import AsyncMongoClient

from bench.procs import (
    Child,
    CpuSnapshot,
    Services,
    children,
    clean_env,
    cpu_model,
    machine_busy,
    proc_cpu,
    product_env,
    publish,
    python,
    rss_mb,
    taskmanager_exe,
    wait_http,
    write_json,
)
from bench.worker_noop import QUEUE, bare_broker, our_broker
from cli.embedded import free_port
from config.settings import Settings
from core import webhooks as core_webhooks
from workers import analytics, cache, maintenance, notifications, search, webhooks
from workers.registry import registry_index

API = "/api/v1"
SECRET = "bench-secret-" + "w" * 40
PASSWORD = "bench password 1"
RESULTS = Path(__file__).resolve().parent / "results"

NOOP_TARGET = 0.90
SEARCH_P95_TARGET_MS = 1000.0
HOOK_P95_TARGET_MS = 2000.0
EVENTS_RATE_TARGET = 200.0
RSS_LIMIT_MB = 100.0
#: Slot words group the tasks written in this many seconds (one search covers a slot, of at
#: most MAX_SLOT tasks: a search returns 50 hits at most).
SLOT_SECONDS = 0.25
MAX_SLOT = 50
#: A slot is searched again at most this often.
MIN_REPOLL = 0.1
#: How long the running worker may take to drain the last run before a restart (s).
DRAIN_BEFORE_RESTART = 120.0
#: How long a ladder step waits for its effects after its last write.
LADDER_SETTLE = 10.0
DEFAULT_LADDER = (10.0, 20.0, 40.0, 80.0, 160.0)


@dataclass(frozen=True)
class Variant:
    """One way of draining no-op messages."""

    key: str
    label: str
    broker: str  # "bare" | "ours"
    actor: str
    queues_only: bool = False


VARIANTS: dict[str, Variant] = {
    v.key: v
    for v in (
        Variant("bare", "bare Dramatiq, sync no-op", "bare", "noop_sync"),
        Variant("ours_sync", "ours, sync no-op", "ours", "noop_sync"),
        Variant("ours_async", "ours, async no-op", "ours", "noop_async"),
        Variant(
            "ours_async_q", "ours, async no-op, --queues bench_noop", "ours", "noop_async", True
        ),
    )
}
DEFAULT_VARIANTS = ("bare", "ours_sync", "ours_async")
EVENT_QUEUES = tuple(
    m.QUEUE for m in (cache, search, webhooks, analytics, notifications, maintenance)
)


@dataclass
class Options:
    """Command-line settings of one run."""

    messages: int = 10_000
    rounds: int = 3
    threads: int = 8
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    rate: float = EVENTS_RATE_TARGET
    seconds: float = 15.0
    drain_timeout: float = 30.0
    pollers: int = 2
    poll_rate: float = 40.0
    profile: str = "auto"  # auto | always | never
    profile_seconds: float = 4.0
    ladder: tuple[float, ...] = DEFAULT_LADDER
    ladder_seconds: float = 5.0
    sections: tuple[str, ...] = ("noop", "events")
    out: Path | None = RESULTS / "workers-latest.txt"
    json_out: Path | None = None


def pct(values: list[float], q: float) -> float:
    """A percentile (nearest rank) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def ms(value: float) -> str:
    """A latency cell: ``  1234ms``, or ``  unseen`` for a task never observed."""
    return f"{'unseen':>8}" if value == math.inf else f"{value:>6.0f}ms"


def cells(d: dict[str, float]) -> str:
    """p50, p95, p99 and max cells of a distribution."""
    return " ".join(ms(d[k]) for k in ("p50", "p95", "p99", "max"))


def verdict(ok: bool) -> str:
    """PASS or MISS."""
    return "PASS" if ok else "MISS"


def log_errors(child: Child) -> list[str]:
    """Error lines in the tail of a child's output (tracebacks, error-level records)."""
    lines = child.output().splitlines()
    marks = ("Traceback", '"level": "error"', '"level": "critical"', "[ERROR]", "[CRITICAL]")
    return [line[:300] for line in lines if any(m in line for m in marks)]


# --------------------------------------------------------------------------------------------
# No-op throughput


@dataclass
class DrainRun:
    """One variant drained once."""

    variant: str
    round: int
    messages: int
    enqueue_s: float
    drain_s: float = math.nan
    steady_s: float = math.nan
    worker_cpu_s: float = math.nan
    machine_cores: float = math.nan
    rss_mb: float = math.nan
    hwm_mb: float = math.nan
    dead: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Messages per second between 10 % and 90 % acknowledged."""
        return 0.8 * self.messages / self.steady_s if self.steady_s > 0 else math.nan

    @property
    def full_rate(self) -> float:
        """Messages per second from the first fetch to the empty queue."""
        return self.messages / self.drain_s if self.drain_s > 0 else math.nan

    @property
    def cpu_us(self) -> float:
        """Worker CPU microseconds per message (whole drain)."""
        return self.worker_cpu_s / self.messages * 1e6

    @property
    def enqueue_rate(self) -> float:
        """Sends per second from this process (one ``send`` per message)."""
        return self.messages / self.enqueue_s if self.enqueue_s > 0 else math.nan


# --------------------------------------------------------------------------------------------
# Events


@dataclass
class Write:
    """One task written during the events load."""

    index: int
    word: str
    slot: str
    scheduled: float
    acked: float = math.nan
    status: int = 0
    task_id: str | None = None
    error: str | None = None


@dataclass
class Load:
    """What one events load wrote and observed (times are this process's monotonic clock)."""

    tag: str
    rate: float
    count: int
    writes: list[Write] = field(default_factory=list)
    by_id: dict[str, Write] = field(default_factory=dict)
    found: dict[str, float] = field(default_factory=dict)
    pending_by_slot: dict[str, int] = field(default_factory=dict)
    last_poll: dict[str, float] = field(default_factory=dict)
    poll_gaps: list[float] = field(default_factory=list)
    searches: int = 0
    search_errors: dict[str, int] = field(default_factory=dict)
    started: float = math.nan
    sends_done: float = math.nan
    ended: float = math.nan
    next_poll_at: float = 0.0
    last_ack: float = math.nan

    def acked(self, w: Write) -> None:
        """A write was acknowledged: its slot has one more task to find."""
        if w.task_id is None:
            return
        self.by_id[w.task_id] = w
        if w.task_id not in self.found:
            self.pending_by_slot[w.slot] = self.pending_by_slot.get(w.slot, 0) + 1

    def saw(self, task_id: str, at: float) -> None:
        """A search returned a task."""
        if task_id in self.found:
            return
        self.found[task_id] = at
        w = self.by_id.get(task_id)
        if w is not None and self.pending_by_slot.get(w.slot, 0) > 0:
            self.pending_by_slot[w.slot] -= 1

    def next_slot(self, now: float) -> str | None:
        """The pending slot searched least recently (none searched within MIN_REPOLL)."""
        best: str | None = None
        best_at = math.inf
        for slot, pending in self.pending_by_slot.items():
            if pending <= 0:
                continue
            at = self.last_poll.get(slot, -math.inf)
            if now - at >= MIN_REPOLL and at < best_at:
                best, best_at = slot, at
        return best

    def ok_writes(self) -> list[Write]:
        """Acknowledged writes (201)."""
        return [w for w in self.writes if w.task_id is not None]


class Receiver:
    """A webhook receiver on loopback recording when each task's delivery first arrives."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: dict[str, float] = {}
        self.duplicates = 0
        self.bad_signatures = 0
        self.bad_bodies = 0
        self.secret: str | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """Where webhooks post."""
        return f"http://127.0.0.1:{self.port}/hook"

    async def handle(self, request: web.Request) -> web.Response:
        """Record the delivery (first arrival per task), check its signature, answer 204."""
        at = time.monotonic()
        body = await request.read()
        if self.secret is not None and not core_webhooks.verify(
            self.secret,
            request.headers.get("X-Webhook-Timestamp", ""),
            body,
            request.headers.get("X-Webhook-Signature", ""),
        ):
            self.bad_signatures += 1
        try:
            task_id = str(json.loads(body)["data"]["task"]["id"])
        except (ValueError, KeyError, TypeError):
            self.bad_bodies += 1
            return web.Response(status=204)
        if task_id in self.received:
            self.duplicates += 1
        else:
            self.received[task_id] = at
        return web.Response(status=204)

    async def start(self) -> None:
        """Listen on 127.0.0.1."""
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


# --------------------------------------------------------------------------------------------
# The benchmark


class WorkerBench:
    """Runs both sections and builds the report."""

    def __init__(self, opts: Options):
        self.opts = opts
        self.results: dict[str, Any] = {}
        self.services: Services | None = None
        self.runs: list[DrainRun] = []
        self.notes: list[str] = []
        self.t0 = time.monotonic()

    def note(self, text: str) -> None:
        """Progress, on stderr (the report goes to stdout and the results file)."""
        elapsed = time.monotonic() - self.t0
        print(f"[bench workers {elapsed:5.1f}s] {text}", file=sys.stderr, flush=True)

    # ---- set-up ---------------------------------------------------------------------------

    @property
    def svc(self) -> Services:
        """The running services."""
        if self.services is None:
            raise RuntimeError("services are not started")
        return self.services

    def settings_for(self, prefix: str) -> Settings:
        """Production settings on our services under ``prefix`` (what the env below says)."""
        svc = self.svc
        return Settings(
            app_env="production",
            mongodb_url=svc.mongo.url,
            mongodb_db=svc.db,
            redis_url=svc.redis_url,
            redis_prefix=prefix,
            jwt_secret=SECRET,
            log_level="WARNING",
        )

    def product_env(self, prefix: str, **extra: str) -> dict[str, str]:
        """The environment of a product process (production settings) under ``prefix``."""
        return product_env(
            self.svc, SECRET, REDIS_PREFIX=prefix, WEBHOOK_ALLOW_HOSTS="127.0.0.1", **extra
        )

    def run(self) -> str:
        """Run the selected sections; returns the report."""
        started = time.monotonic()
        self.results["started_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        self.results["load_average_start"] = os.getloadavg()
        self.note("starting SecantusDB and Redis")
        self.services = Services.start()
        svc = self.services
        self.results["redis_url"] = svc.redis_url
        self.results["redis_prefix"] = svc.prefix
        self.results["redis_private"] = svc.private_redis is not None
        self.results["services"] = (
            f"SecantusDB {version('SecantusDB')} in memory (embedded); Redis "
            f"{svc.redis_version()} ({svc.redis_source}), key prefix {svc.prefix}"
        )
        imports: subprocess.Popen[str] | None = None
        try:
            if "noop" in self.opts.sections:
                self.noop_section()
                self.profile_noop()
            imports = self.start_import_rss()
            if "events" in self.opts.sections:
                asyncio.run(self.events_section())
            self.results["imports"] = self.finish_import_rss(imports)
        finally:
            self.note("stopping everything and deleting our keys")
            if imports is not None and imports.poll() is None:
                imports.kill()
                imports.communicate()
            svc.stop()
        self.results["load_average_end"] = os.getloadavg()
        self.results["total_seconds"] = round(time.monotonic() - started, 1)
        return self.report()

    # ---- no-op throughput ----------------------------------------------------------------

    def noop_section(self) -> None:
        """Drain N no-ops per variant, variants interleaved over rounds."""
        opts = self.opts
        for rnd in range(1, opts.rounds + 1):
            order = list(opts.variants)
            # Rotate so no variant always runs first (or right after another's clean-up).
            shift = (rnd - 1) % len(order)
            for key in order[shift:] + order[:shift]:
                self.note(f"no-op round {rnd}/{opts.rounds}: {VARIANTS[key].label}")
                self.runs.append(self.drain_once(VARIANTS[key], rnd))
        self.results["noop"] = {
            "messages": opts.messages,
            "rounds": opts.rounds,
            "threads": opts.threads,
            "runs": [
                {**asdict(r), "rate": r.rate, "full_rate": r.full_rate, "cpu_us": r.cpu_us}
                for r in self.runs
            ],
            "median_rate": {k: self.median_rate(k) for k in opts.variants},
        }
        base = self.median_rate("bare")
        if "bare" in opts.variants and base > 0:
            self.results["noop"]["ratio"] = {
                k: self.median_rate(k) / base for k in opts.variants if k != "bare"
            }

    def start_import_rss(self) -> subprocess.Popen[str]:
        """Start measuring the RSS each import step of a worker adds
        (``bench/worker_imports.py``; memory, unlike time, is not disturbed by what runs
        beside it)."""
        return subprocess.Popen(
            [python(), "-m", "bench.worker_imports"],
            env=self.product_env(f"{self.svc.prefix}imp:"),
            cwd=Path(__file__).resolve().parent.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    @staticmethod
    def finish_import_rss(proc: subprocess.Popen[str]) -> dict[str, Any]:
        """Its result (bounded wait)."""
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return {"error": "timed out"}
        if proc.returncode != 0:
            return {"error": err[-1000:]}
        result: dict[str, Any] = json.loads(out)
        return result

    def median_rate(self, key: str) -> float:
        """The median steady rate of a variant's runs (NaN if none succeeded)."""
        rates = [r.rate for r in self.runs if r.variant == key and not math.isnan(r.rate)]
        return statistics.median(rates) if rates else math.nan

    def noop_worker(
        self, variant: Variant, prefix: str, namespace: str, extra_env: dict[str, str]
    ) -> Child:
        """Start the worker process that drains the no-op queue."""
        args = [
            python(),
            "-m",
            "dramatiq",
            "bench.worker_noop:broker",
            "--processes",
            "1",
            "--threads",
            str(self.opts.threads),
        ]
        if variant.broker == "bare":
            env = clean_env(
                BENCH_NOOP_BROKER="bare",
                BENCH_REDIS_URL=self.svc.redis_url,
                BENCH_NAMESPACE=namespace,
                **extra_env,
            )
        else:
            # What `taskmanager worker` passes (cli/main.py), on the bench's broker module.
            args += ["--skip-logging", "--worker-shutdown-timeout", "10000"]
            env = self.product_env(prefix, BENCH_NOOP_BROKER="ours", **extra_env)
        if variant.queues_only:
            args += ["--queues", QUEUE]
        if "BENCH_PROFILE_OUT" in extra_env:
            # Dramatiq's CLI takes extra modules only right after the broker.
            args.insert(args.index("bench.worker_noop:broker") + 1, "bench.worker_profile")
        return self.svc.spawn(f"noop-{variant.key}", args, env)

    def drain_once(
        self,
        variant: Variant,
        rnd: int,
        extra_env: dict[str, str] | None = None,
        messages: int | None = None,
    ) -> DrainRun:
        """Fill the queue with N messages, start one worker process, time the drain."""
        n = messages or self.opts.messages
        prefix = f"{self.svc.prefix}n{rnd}{variant.key}:"
        if variant.broker == "bare":
            namespace = f"{prefix}dramatiq"
            broker, actors = bare_broker(self.svc.redis_url, namespace)
        else:
            broker, actors = our_broker(self.settings_for(prefix))
            namespace = broker.namespace  # type: ignore[attr-defined]
        actor = actors[variant.actor]
        t0 = time.perf_counter()
        for _ in range(n):
            actor.send()
        run = DrainRun(variant.key, rnd, n, time.perf_counter() - t0)
        broker.close()
        env = {"BENCH_PROFILE_BROKER": "bench.worker_noop:broker", **(extra_env or {})}
        child = self.noop_worker(variant, prefix, namespace, env)
        try:
            self.watch_drain(child, namespace, run)
        except RuntimeError as exc:
            run.errors.append(str(exc))
        finally:
            child.stop()
            run.errors += log_errors(child)
            child.close()
        return run

    def watch_drain(self, child: Child, namespace: str, run: DrainRun) -> None:
        """Poll Redis every 2 ms: first fetch, 10 % and 90 % acknowledged, empty."""
        r = self.svc.redis
        n = run.messages
        ready_key, msgs_key = f"{namespace}:{QUEUE}", f"{namespace}:{QUEUE}.msgs"
        start_deadline = time.monotonic() + 60
        first = t10 = t90 = math.nan
        pid = 0
        cpu0 = busy0 = 0.0
        while True:
            pipe = r.pipeline(transaction=False)
            pipe.llen(ready_key)
            pipe.hlen(msgs_key)
            ready, left = pipe.execute()
            now = time.monotonic()
            if math.isnan(first):
                if ready < n:
                    first = now
                    pids = children(child.pid)
                    pid = pids[0] if pids else 0
                    cpu0, busy0 = proc_cpu(pid), machine_busy()
                elif now > start_deadline or not child.alive():
                    raise RuntimeError(f"worker took no message:\n{child.output()[-1500:]}")
            else:
                if math.isnan(t10) and left <= 0.9 * n:
                    t10 = now
                if math.isnan(t90) and left <= 0.1 * n:
                    t90 = now
                if left == 0 and ready == 0:
                    break
                if now > first + n / 50 + 60 or not child.alive():
                    raise RuntimeError(
                        f"drain incomplete ({left} of {n} left):\n{child.output()[-1500:]}"
                    )
            time.sleep(0.002)
        run.drain_s = now - first
        run.steady_s = t90 - t10
        run.worker_cpu_s = proc_cpu(pid) - cpu0 if pid else math.nan
        run.machine_cores = (machine_busy() - busy0) / run.drain_s
        if pid:
            run.rss_mb, run.hwm_mb = rss_mb(pid)
        run.dead = int(r.zcard(f"{namespace}:{QUEUE}.XQ"))
        if run.dead:
            run.errors.append(f"{run.dead} message(s) dead-lettered")

    # ---- events through the real actors ----------------------------------------------------

    async def events_section(self) -> None:
        """Start web, worker and the receiver; warm up; climb the rate ladder; diagnose; then
        the measured run at the target rate on a fresh worker with empty queues."""
        opts = self.opts
        svc = self.svc
        prefix = f"{svc.prefix}ev:"
        self.ev_prefix = prefix
        self.web_port = free_port()
        env = self.product_env(prefix)
        self.note("events: starting taskmanager web and taskmanager worker")
        self.web = svc.spawn("web", [taskmanager_exe(), "web", "--port", str(self.web_port)], env)
        self.worker = self.start_worker(env)
        self.receiver = Receiver()
        await self.receiver.start()
        self.mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(svc.mongo.url)
        try:
            await wait_http(self.web, f"{self.base}/readyz", timeout=60)
            await self.wait_worker(self.worker)
            await self.sign_up()
            self.note("events: warm-up")
            warm = await self.load(rate=min(opts.rate, 20.0), count=10, settle=30.0)
            if len(warm.found) < len(warm.ok_writes()):
                raise RuntimeError("warm-up tasks never became searchable")
            missed_at = await self.ladder()
            if opts.profile == "always" or (opts.profile == "auto" and missed_at is not None):
                # Diagnosed where the worker first falls behind (the web still keeps up there).
                with tempfile.TemporaryDirectory(prefix="bench-workers-prof-") as tmp:
                    profiles = await self.profile_events(tmp, missed_at or opts.rate)
                self.results.setdefault("profiles", {}).update(profiles)
            await self.restart_worker()
            self.note(f"events: {opts.rate:g} writes/s for {opts.seconds:g} s")
            ev = await self.measure(opts.rate, round(opts.rate * opts.seconds), opts.drain_timeout)
            ev["spot_check"] = await self.spot_check(self.last_load)
            ev["receiver"] = {
                "duplicates": self.receiver.duplicates,
                "bad_signatures": self.receiver.bad_signatures,
                "bad_bodies": self.receiver.bad_bodies,
            }
            ev["log_errors"] = {"web": log_errors(self.web), "worker": log_errors(self.worker)}
            self.results["events"] = ev
        finally:
            # Stopped together: each waits for its graceful shutdown.
            await asyncio.gather(
                asyncio.to_thread(self.worker.stop), asyncio.to_thread(self.web.stop)
            )
            await self.receiver.stop()
            await self.mongo.close()

    async def measure(self, rate: float, count: int, settle: float) -> dict[str, Any]:
        """One load, with everything the report shows about it."""
        svc = self.svc
        pids = self.event_pids()
        before, ops0 = svc.snapshot(pids), await self.mongo_ops()
        load = self.last_load = await self.load(rate=rate, count=count, settle=settle)
        after, ops1 = svc.snapshot(pids), await self.mongo_ops()
        ev: dict[str, Any] = {
            "left_in_queues": self.queue_backlog(),
            "outbox_pending": await self.outbox_pending(),
            "server": await self.server_breakdown(load),
        }
        ev.update(self.summarise(load))
        ev["cpu_cores"] = self.cores(before, after)
        ev["mongo_ops"] = {k: ops1[k] - ops0.get(k, 0) for k in ops1}
        ev["mongo_ops_rate"] = round(sum(ev["mongo_ops"].values()) / (after.at - before.at), 1)
        ev["worker_rss_mb"], ev["worker_hwm_mb"] = rss_mb(pids["worker"])
        ev["web_rss_mb"], ev["web_hwm_mb"] = rss_mb(pids["web"])
        srv = ev["server"]
        # One message per (event, actor) from the relay, plus one per delivery created.
        sent = 4 * srv["relay_enqueued_ms"]["n"] + srv["deliveries"]
        ev["worker_messages"] = sent - sum(ev["left_in_queues"].values())
        ev["worker_msg_rate"] = round(ev["worker_messages"] / ev["observed_s"], 1)
        return ev

    async def ladder(self) -> float | None:
        """Short steps of rising rates until one misses a latency target (or the web cannot
        acknowledge its rate); returns that step's rate (None: every step passed)."""
        steps: list[dict[str, Any]] = []
        self.results["ladder"] = {"seconds": self.opts.ladder_seconds, "steps": steps}
        for rate in self.opts.ladder:
            self.note(f"events: ladder step, {rate:g} writes/s for {self.opts.ladder_seconds:g} s")
            count = max(1, round(rate * self.opts.ladder_seconds))
            ev = await self.measure(rate, count, settle=LADDER_SETTLE)
            keys = (
                "offered_rate",
                "acked",
                "ack_rate",
                "searchable_ms",
                "webhook_ms",
                "worker_msg_rate",
                "mongo_ops_rate",
                "cpu_cores",
            )
            step = {k: ev[k] for k in keys}
            step["mongo_ops_per_task"] = round(
                sum(ev["mongo_ops"].values()) / max(ev["acked"], 1), 1
            )
            step["pass"] = (
                ev["searchable_ms"]["p95"] <= SEARCH_P95_TARGET_MS
                and ev["webhook_ms"]["p95"] <= HOOK_P95_TARGET_MS
                and ev["ack_rate"] >= 0.95 * rate
            )
            steps.append(step)
            if not step["pass"]:
                return rate
        return None

    async def restart_worker(self, profile_out: str | None = None, cpu: bool = False) -> None:
        """Let the running worker finish what the last run sent (the outbox and the queues
        empty, :data:`DRAIN_BEFORE_RESTART` s at most), stop it, drop whatever is left
        (``reset_backlog``) and start a fresh one. Draining first matters: a dropped message
        leaves its event in flight (side effects unfinished) until the relay's sweep sends it
        again a bound later (``OUTBOX_REDELIVER_AFTER_S``, 60 s), and a window's worth of
        such events held every write of the next run in the outbox (a 200 writes/s run after
        the 80 writes/s step saw nothing dispatched in 45 s)."""
        deadline = time.monotonic() + DRAIN_BEFORE_RESTART
        while time.monotonic() < deadline and (
            await self.outbox_pending() or any(self.queue_backlog().values())
        ):
            await asyncio.sleep(0.2)
        await asyncio.to_thread(self.worker.stop)
        await self.reset_backlog()
        env = self.product_env(self.ev_prefix)
        self.worker = self.start_worker(env, profile_out=profile_out, cpu=cpu)
        await self.wait_worker(self.worker)

    def queue_backlog(self) -> dict[str, int]:
        """Messages not yet acknowledged, per queue of the events broker (ready + fetched)."""
        r = self.svc.redis
        ns = f"{self.ev_prefix}dramatiq"
        return {q: int(r.hlen(f"{ns}:{q}.msgs")) for q in EVENT_QUEUES}

    async def outbox_pending(self) -> int:
        """Events the relay has not enqueued yet."""
        db = self.mongo[self.svc.db]
        return int(await db["events"].count_documents({"pending": True}))

    async def reset_backlog(self, timeout: float = 120.0) -> None:
        """Between runs, with no worker running: let the relay empty the outbox, then drop
        the messages the previous run left (they were measured already), so the next run
        starts from empty queues."""
        deadline = time.monotonic() + timeout
        while await self.outbox_pending() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        r = self.svc.redis
        keys = list(r.scan_iter(match=f"{self.ev_prefix}dramatiq:*", count=1000))
        for start in range(0, len(keys), 1000):
            r.delete(*keys[start : start + 1000])

    async def mongo_ops(self) -> dict[str, int]:
        """The MongoDB server's operation counters (every client's: web, worker, this one)."""
        status = await self.mongo.admin.command("serverStatus")
        return {k: int(v) for k, v in status.get("opcounters", {}).items()}

    @property
    def base(self) -> str:
        """The web process's URL."""
        return f"http://127.0.0.1:{self.web_port}"

    def start_worker(
        self, env: dict[str, str], profile_out: str | None = None, cpu: bool = False
    ) -> Child:
        """``taskmanager worker --processes 1 --threads N``; profiled, the Dramatiq CLI with
        exactly the arguments ``taskmanager worker`` gives it plus the profiler module (which
        the CLI takes only right after the broker, where ``taskmanager worker`` cannot put it)."""
        threads = str(self.opts.threads)
        if profile_out is None:
            args = [taskmanager_exe(), "worker", "--processes", "1", "--threads", threads]
            return self.svc.spawn("worker", args, env)
        args = [
            python(),
            "-m",
            "dramatiq",
            "workers.entry:broker",
            "bench.worker_profile",
            "--processes",
            "1",
            "--threads",
            threads,
            "--skip-logging",
            "--worker-shutdown-timeout",
            str(Settings.model_fields["worker_shutdown_timeout_ms"].default),
        ]
        env = {**env, "BENCH_PROFILE_OUT": profile_out, "BENCH_PROFILE_CPU": "1" if cpu else "0"}
        return self.svc.spawn("worker-instrumented", args, env)

    async def wait_worker(self, child: Child, timeout: float = 60.0) -> None:
        """Until a worker process of ``child`` has registered (its consumers run)."""
        r = self.svc.redis
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not child.alive():
                raise RuntimeError(f"worker exited:\n{child.output()}")
            live = r.zrangebyscore(
                registry_index(self.ev_prefix), time.time() * 1000 - 3000, "+inf"
            )
            if live and children(child.pid):
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"no worker registered within {timeout}s:\n{child.output()}")

    def event_pids(self) -> dict[str, int]:
        """The processes whose CPU the events section reports."""
        pids = children(self.worker.pid)
        mongo = self.svc.mongo.process
        return {
            "web": self.web.pid,
            "worker": pids[0] if pids else self.worker.pid,
            "mongo": mongo.pid if mongo is not None else 0,
            "bench": os.getpid(),
        }

    def cores(self, before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
        """Cores busy per process between two snapshots (plus Redis and the whole machine)."""
        span = after.at - before.at
        out = {k: (after.procs[k] - before.procs[k]) / span for k in after.procs}
        out["redis"] = (after.redis - before.redis) / span
        out["machine"] = (after.machine - before.machine) / span
        return {k: round(v, 3) for k, v in out.items()}

    async def sign_up(self) -> None:
        """Register the user and a webhook on ``task.created`` pointing at the receiver."""
        async with aiohttp.ClientSession(self.base) as http:
            resp = await http.post(
                f"{API}/auth/register",
                json={
                    "email": f"w{uuid.uuid4().hex[:8]}@example.com",
                    "password": PASSWORD,
                    "name": "Bench",
                },
            )
            body = await resp.json()
            if resp.status != 201:
                raise RuntimeError(f"register: HTTP {resp.status} {body}")
            self.token = body["access_token"]
            self.user_id = str(body["user"]["id"])
            resp = await http.post(
                f"{API}/webhooks",
                json={"url": self.receiver.url, "events": ["task.created"]},
                headers=self.auth,
            )
            body = await resp.json()
            if resp.status != 201:
                raise RuntimeError(f"webhook: HTTP {resp.status} {body}")
            self.receiver.secret = body["secret"]

    @property
    def auth(self) -> dict[str, str]:
        """The user's Authorization header."""
        return {"Authorization": f"Bearer {self.token}"}

    async def load(self, *, rate: float, count: int, settle: float) -> Load:
        """Write ``count`` tasks open loop at ``rate``/s; follow them until every acknowledged
        one is searchable, delivered and folded into analytics, or ``settle`` seconds after
        the last send."""
        tag = uuid.uuid4().hex[:4]
        per_slot = min(MAX_SLOT, max(1, round(rate * SLOT_SECONDS)))
        load = Load(tag, rate, count)
        load.writes = [
            Write(i, f"u{tag}{i:06d}", f"s{tag}{i // per_slot:06d}", 0.0) for i in range(count)
        ]
        stop = asyncio.Event()
        timeout = aiohttp.ClientTimeout(total=60)
        async with (
            aiohttp.ClientSession(
                self.base, timeout=timeout, connector=aiohttp.TCPConnector(limit=512)
            ) as writer,
            aiohttp.ClientSession(
                self.base, timeout=timeout, connector=aiohttp.TCPConnector(limit=self.opts.pollers)
            ) as searcher,
        ):
            pollers = [
                asyncio.create_task(self.poll_search(searcher, load, stop))
                for _ in range(self.opts.pollers)
            ]
            try:
                await self.send_all(writer, load)
                deadline = time.monotonic() + settle
                while time.monotonic() < deadline:
                    if self.settled(load):
                        break
                    await asyncio.sleep(0.05)
                # The effect no client sees: analytics (asked of MongoDB, so less often).
                while time.monotonic() < deadline and not await self.folded(load):
                    await asyncio.sleep(0.25)
            finally:
                stop.set()
                await asyncio.gather(*pollers, return_exceptions=True)
                load.ended = time.monotonic()
        return load

    async def folded(self, load: Load) -> bool:
        """Every acknowledged write's ``task.created`` event was folded into analytics."""
        db = self.mongo[self.svc.db]
        ids = [w.task_id for w in load.ok_writes()]
        events = (
            await db["events"]
            .find({"type": "task.created", "subject_id": {"$in": ids}}, {"_id": 1})
            .to_list()
        )
        seen = await db["analytics_seen"].count_documents(
            {"_id": {"$in": [str(e["_id"]) for e in events]}}
        )
        return len(events) == len(ids) == seen

    def settled(self, load: Load) -> bool:
        """Every acknowledged write was found by search and its webhook received."""
        ok = load.ok_writes()
        return all(w.task_id in load.found and w.task_id in self.receiver.received for w in ok)

    async def send_all(self, http: aiohttp.ClientSession, load: Load) -> None:
        """Schedule every send at its fixed time, never waiting for answers."""
        in_flight: set[asyncio.Task[None]] = set()
        load.started = t0 = time.monotonic() + 0.05
        for w in load.writes:
            w.scheduled = t0 + w.index / load.rate
            delay = w.scheduled - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(self.write(http, load, w))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        load.sends_done = time.monotonic()
        if in_flight:
            await asyncio.gather(*in_flight)
        load.last_ack = max((w.acked for w in load.writes if not math.isnan(w.acked)), default=0)

    async def write(self, http: aiohttp.ClientSession, load: Load, w: Write) -> None:
        """Create one task; record when its answer came."""
        try:
            async with http.post(
                f"{API}/tasks", json={"title": f"bench {w.word} {w.slot}"}, headers=self.auth
            ) as resp:
                body = await resp.read()
                w.acked = time.monotonic()
                w.status = resp.status
                if resp.status == 201:
                    w.task_id = str(json.loads(body)["id"])
                    load.acked(w)
                else:
                    w.error = f"HTTP {resp.status}: {body[:200]!r}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            w.acked = time.monotonic()
            w.error = repr(exc)

    async def poll_search(
        self, http: aiohttp.ClientSession, load: Load, stop: asyncio.Event
    ) -> None:
        """Search the least recently searched pending slot, again and again, until stopped."""
        while not stop.is_set():
            now = time.monotonic()
            if now < load.next_poll_at:
                # Searches are spaced globally: polling must not become the load it measures.
                await asyncio.sleep(load.next_poll_at - now)
                continue
            slot = load.next_slot(now)
            if slot is None:
                await asyncio.sleep(0.005)
                continue
            load.next_poll_at = now + 1 / self.opts.poll_rate
            previous = load.last_poll.get(slot)
            load.last_poll[slot] = now
            if previous is not None:
                load.poll_gaps.append(now - previous)
            try:
                async with http.get(
                    f"{API}/search", params={"q": slot, "limit": "50"}, headers=self.auth
                ) as resp:
                    body = await resp.read()
                    at = time.monotonic()
                    load.searches += 1
                    if resp.status != 200:
                        key = f"HTTP {resp.status}"
                        load.search_errors[key] = load.search_errors.get(key, 0) + 1
                        continue
                for item in json.loads(body)["items"]:
                    load.saw(str(item["task"]["id"]), at)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                key = type(exc).__name__
                load.search_errors[key] = load.search_errors.get(key, 0) + 1
                await asyncio.sleep(0.05)

    def summarise(self, load: Load) -> dict[str, Any]:
        """Client-side latencies and rates of one load."""
        ok = load.ok_writes()
        received = self.receiver.received
        # A task never seen within the run counts as infinitely late (the percentiles must not
        # improve by leaving the slowest out).
        searchable = [
            (load.found[w.task_id] - w.acked) * 1000 if w.task_id in load.found else math.inf
            for w in ok
        ]
        hooked = [
            (received[w.task_id] - w.acked) * 1000 if w.task_id in received else math.inf
            for w in ok
        ]
        ack = [(w.acked - w.scheduled) * 1000 for w in ok]
        done = [
            max(load.found[w.task_id], received[w.task_id])
            for w in ok
            if w.task_id in load.found and w.task_id in received
        ]
        statuses: dict[str, int] = {}
        for w in load.writes:
            if w.task_id is None:
                key = w.error.split(":")[0] if w.error else "no answer"
                statuses[key] = statuses.get(key, 0) + 1
        send_span = load.sends_done - load.started
        first_error = next((w.error for w in load.writes if w.error), None)
        # Tasks still waiting for an effect when the last write was acknowledged.
        backlog = sum(
            1
            for tid in (w.task_id or "" for w in ok)
            if max(load.found.get(tid, math.inf), received.get(tid, math.inf)) > load.last_ack
        )
        return {
            "offered_rate": load.rate,
            "writes": load.count,
            "acked": len(ok),
            "write_errors": statuses,
            "write_error_sample": first_error,
            "send_span_s": round(send_span, 3),
            # n writes fill n slots of 1/rate: the last one's slot ends 1/rate after it is sent.
            "ack_rate": round(len(ok) / (load.last_ack - load.started + 1 / load.rate), 1)
            if ok
            else 0.0,
            "ack_ms": self.dist(ack),
            "searchable_ms": self.dist(searchable),
            "webhook_ms": self.dist(hooked),
            "searchable_seen": sum(1 for v in searchable if v < math.inf),
            "webhook_seen": sum(1 for v in hooked if v < math.inf),
            "observed_s": round(load.ended - load.started, 1),
            "processed": len(done),
            "processed_rate": round(len(done) / (max(done) - load.started), 1) if done else 0.0,
            "backlog_at_last_ack": backlog,
            "searches": load.searches,
            "search_rate": round(load.searches / (load.ended - load.started), 1),
            "search_errors": load.search_errors,
            "repoll_ms_p50": round(pct(load.poll_gaps, 50) * 1000, 1),
        }

    @staticmethod
    def dist(values: list[float]) -> dict[str, float]:
        """p50/p95/p99/max in ms (``inf``: not seen within the run), ``n`` seen of ``total``."""
        return {
            "p50": round(pct(values, 50), 1),
            "p95": round(pct(values, 95), 1),
            "p99": round(pct(values, 99), 1),
            "max": round(max(values), 1) if values else math.nan,
            "n": sum(1 for v in values if v < math.inf),
            "total": len(values),
        }

    async def server_breakdown(self, load: Load) -> dict[str, Any]:
        """From MongoDB's timestamps: event created → relay enqueued, index entry written,
        analytics folded, webhook delivered (ms; the web and worker clocks are this machine's)."""
        db = self.mongo[self.svc.db]
        ids = {w.task_id for w in load.ok_writes()}
        events = {
            e["subject_id"]: e
            async for e in db["events"].find(
                {"type": "task.created", "user_id": self.user_id},
                {"subject_id": 1, "created_at": 1, "dispatched_at": 1},
            )
            if e["subject_id"] in ids
        }
        created = {tid: e["created_at"] for tid, e in events.items()}
        by_event = {str(e["_id"]): tid for tid, e in events.items()}
        oids = [ObjectId(t) for t in ids]
        indexed = {
            str(d["_id"]): d["indexed_at"]
            async for d in db["search_index"].find({"_id": {"$in": oids}}, {"indexed_at": 1})
            if "indexed_at" in d
        }
        # When the fold was written (``at`` is when a later compaction added it up).
        folded = {
            by_event[d["_id"]]: d["folded_at"]
            async for d in db["analytics_seen"].find(
                {"_id": {"$in": list(by_event)}}, {"folded_at": 1}
            )
        }
        delivered: dict[str, datetime] = {}
        attempts: list[int] = []
        async for d in db["webhook_deliveries"].find(
            {"owner": self.user_id, "event_id": {"$in": list(by_event)}},
            {"event_id": 1, "delivered_at": 1, "attempts": 1},
        ):
            attempts.append(int(d.get("attempts", 0)))
            if d.get("delivered_at") is not None:
                delivered[by_event[d["event_id"]]] = d["delivered_at"]

        def since(marks: dict[str, datetime | None]) -> dict[str, float]:
            return self.dist(
                [
                    (at - when).total_seconds() * 1000 if (at := marks.get(tid)) else math.inf
                    for tid, when in created.items()
                ]
            )

        return {
            "events": len(events),
            "relay_enqueued_ms": since({t: e.get("dispatched_at") for t, e in events.items()}),
            "indexed_ms": since(dict(indexed)),
            "analytics_ms": since(dict(folded)),
            "delivered_ms": since(dict(delivered)),
            "analytics_folded": len(folded),
            "deliveries": len(attempts),
            "deliveries_retried": sum(1 for a in attempts if a > 1),
        }

    async def spot_check(self, load: Load, sample: int = 20) -> dict[str, int]:
        """Search some tasks by their own unique word: each must be found."""
        ok = [w for w in load.ok_writes() if w.task_id in load.found]
        picked = random.sample(ok, min(sample, len(ok)))
        hits = 0
        async with aiohttp.ClientSession(self.base) as http:
            for w in picked:
                async with http.get(f"{API}/search", params={"q": w.word}, headers=self.auth) as r:
                    items = (await r.json())["items"] if r.status == 200 else []
                if [i["task"]["id"] for i in items] == [w.task_id]:
                    hits += 1
        return {"checked": len(picked), "found": hits}

    # ---- profiles -------------------------------------------------------------------------

    def noop_missed(self) -> bool:
        """Whether the async no-op through our set-up missed its throughput target."""
        ratio = self.results.get("noop", {}).get("ratio", {}).get("ours_async")
        return ratio is not None and not ratio >= NOOP_TARGET

    def profile_noop(self) -> None:
        """Profile the bare and our async no-op workers (their difference is our cost)."""
        if self.opts.profile == "never" or (self.opts.profile == "auto" and not self.noop_missed()):
            return
        profiles = self.results.setdefault("profiles", {})
        runs = [(k, "timings") for k in ("bare", "ours_sync", "ours_async")]
        runs += [(k, "cpu") for k in ("bare", "ours_async")]
        with tempfile.TemporaryDirectory(prefix="bench-workers-prof-") as tmp:
            for key, mode in runs:
                self.note(f"no-op diagnostic run ({mode}): {VARIANTS[key].label}")
                out = str(Path(tmp, f"noop-{key}-{mode}.prof"))
                env = {"BENCH_PROFILE_OUT": out, "BENCH_PROFILE_CPU": "1" if mode == "cpu" else "0"}
                run = self.drain_once(VARIANTS[key], 0, env, min(self.opts.messages, 4000))
                profile = self.read_profile(out, run.messages, "message")
                profile["rate_instrumented"] = run.rate
                profiles[f"noop_{key}_{mode}"] = profile

    async def profile_events(self, tmp: str, rate: float) -> dict[str, Any]:
        """Run the load again at ``rate``, shorter, on an instrumented worker: once with
        timings only (actors, queue waits, MongoDB round trips), once under cProfile."""
        out: dict[str, Any] = {}
        for mode in ("timings", "cpu"):
            self.note(f"events: diagnostic run ({mode}, {rate:g} writes/s), instrumented worker")
            path = str(Path(tmp, f"events-{mode}.prof"))
            await self.restart_worker(profile_out=path, cpu=mode == "cpu")
            try:
                count = max(1, round(rate * self.opts.profile_seconds))
                # Timings need no complete drain: a shorter wait keeps the diagnosis quick.
                settle = min(self.opts.drain_timeout, 15.0)
                load = await self.load(rate=rate, count=count, settle=settle)
                summary = self.summarise(load)
            finally:
                # The records are written when the worker shuts down gracefully.
                await asyncio.to_thread(self.worker.stop, 60)
            profile = self.read_profile(path, summary["acked"], "event")
            profile["run"] = {
                k: summary[k]
                for k in (
                    "offered_rate",
                    "acked",
                    "searchable_ms",
                    "webhook_ms",
                    "processed",
                    "processed_rate",
                )
            }
            out[f"events_{mode}"] = profile
        return out

    def read_profile(self, path: str, units: int, unit: str) -> dict[str, Any]:
        """Digest an instrumented worker's records: actor timings, MongoDB round trips, CPU
        by thread role and, when profiled, CPU by package and the top functions."""
        record_path = Path(path + ".json")
        if not record_path.exists():
            return {"error": "the instrumented worker wrote no records"}
        record = json.loads(record_path.read_text())
        if unit == "event":
            # Events the worker handled (one index_task message each): messages the previous
            # run left behind may be among them, tasks of this run still queued are not.
            units = record["actors"].get("index_task", {}).get("messages") or units
        digest: dict[str, Any] = {"units": units, "unit": unit, **record}
        if not Path(path).exists():
            return digest
        stats = pstats.Stats(path)
        raw: dict[tuple[str, int, str], tuple[int, int, float, float, Any]]
        raw = stats.stats  # type: ignore[attr-defined]
        total = sum(v[2] for v in raw.values()) or 1e-9
        packages: dict[str, float] = {}
        for (file, _line, name), (_cc, _nc, tt, _ct, _callers) in raw.items():
            key = package_of(file, name)
            packages[key] = packages.get(key, 0.0) + tt
        top_self = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:20]
        ours = [
            kv
            for kv in sorted(raw.items(), key=lambda kv: kv[1][3], reverse=True)
            if package_of(kv[0][0], kv[0][2]).startswith("ours:")
        ][:12]
        digest.update(
            {
                "cpu_s": round(total, 3),
                "packages": {
                    k: round(v, 4) for k, v in sorted(packages.items(), key=lambda kv: -kv[1])
                },
                "top_self": [
                    {"fn": fn_label(k), "self_s": round(v[2], 4), "calls": v[1]}
                    for k, v in top_self
                ],
                "ours_cumulative": [
                    {"fn": fn_label(k), "cum_s": round(v[3], 4), "calls": v[1]} for k, v in ours
                ],
            }
        )
        return digest

    # ---- the report -----------------------------------------------------------------------

    def report(self) -> str:
        """The text report (also kept as JSON in ``self.results``)."""
        lines: list[str] = []
        add = lines.append
        res = self.results
        add("Worker benchmark (python -m bench workers): everything below was measured in one run")
        add(f"  when      {res['started_at']}, {res['total_seconds']:.0f} s in all")
        add(
            f"  machine   {os.cpu_count()} cores ({cpu_model()}), {platform.system()}, Python "
            f"{platform.python_version()}, Dramatiq {version('dramatiq')}, redis-py "
            f"{version('redis')}, PyMongo {version('pymongo')}"
        )
        la0, la1 = res["load_average_start"][0], res["load_average_end"][0]
        add(
            f"  load      1-min load average {la0:.1f} at start, {la1:.1f} at end "
            "(a shared machine: other work competes for the same cores)"
        )
        add(f"  services  {res['services']}")
        if "noop" in res:
            self.report_noop(add)
        if "events" in res:
            self.report_events(add)
        if res.get("ladder", {}).get("steps"):
            self.report_ladder(add)
        self.report_targets(add)
        if res.get("profiles"):
            self.report_profiles(add)
        add("")
        return "\n".join(lines)

    def report_noop(self, add: Callable[[str], None]) -> None:
        """Section 1."""
        noop = self.results["noop"]
        add("")
        add(
            f"1. No-op throughput: {noop['messages']} messages per run, ONE worker process "
            f"(--processes 1 --threads {noop['threads']}), {noop['rounds']} round(s), variants "
            "interleaved"
        )
        add("   rate = messages/s between 10 % and 90 % acknowledged (median of the rounds)")
        add(
            f"   {'variant':<40} {'msgs/s':>8} {'vs bare':>8} {'rounds':>20} {'whole':>7} "
            f"{'CPU/msg':>8} {'sends/s':>8} {'RSS MB':>7}"
        )
        base = self.median_rate("bare")
        for key in self.opts.variants:
            runs = [r for r in self.runs if r.variant == key]
            rate = self.median_rate(key)
            rounds = " ".join(f"{r.rate:.0f}" for r in runs)
            whole = statistics.median([r.full_rate for r in runs]) if runs else math.nan
            cpu = statistics.median([r.cpu_us for r in runs]) if runs else math.nan
            sends = statistics.median([r.enqueue_rate for r in runs]) if runs else math.nan
            rss = max((r.rss_mb for r in runs), default=math.nan)
            vs = f"{rate / base:.0%}" if base > 0 and key != "bare" else "-"
            add(
                f"   {VARIANTS[key].label:<40} {rate:>8.0f} {vs:>8} {rounds:>20} {whole:>7.0f} "
                f"{cpu:>6.0f}us {sends:>8.0f} {rss:>7.1f}"
            )
        add(
            "   whole = messages/s from the first fetch to the empty queue; CPU/msg = the worker "
            "process's CPU over the drain; sends/s = enqueue from this process"
        )
        cores = statistics.median([r.machine_cores for r in self.runs]) if self.runs else math.nan
        add(f"   machine cores busy during the drains (median): {cores:.2f} of {os.cpu_count()}")
        errors = [e for r in self.runs for e in r.errors]
        add(f"   errors: {len(errors)}" + (f" (first: {errors[0][:200]})" if errors else ""))

    def report_events(self, add: Callable[[str], None]) -> None:
        """Section 2."""
        ev = self.results["events"]
        srv = ev["server"]
        add("")
        add(
            f"2. Events through the real actors: {ev['offered_rate']:g} writes/s offered open loop "
            f"for {ev['send_span_s']:.1f} s ({ev['writes']} tasks), one `taskmanager web`, one "
            f"`taskmanager worker --processes 1 --threads {self.opts.threads}`"
        )
        add(
            "   each task.created feeds 4 actors (refresh_user_cache, index_task, "
            "fan_out_webhooks, fold_analytics) + 1 deliver_webhook message"
        )
        ack = ev["ack_ms"]
        add(
            f"   writes acknowledged {ev['acked']}/{ev['writes']} at {ev['ack_rate']:.1f}/s; "
            f"send → 201 p50 {ack['p50']:.0f} ms, p95 {ack['p95']:.0f} ms, "
            f"p99 {ack['p99']:.0f} ms; errors {ev['write_errors'] or 0}"
        )
        add(
            f"   {'from the 201 (client clock)':<34} {'p50':>8} {'p95':>8} {'p99':>8} {'max':>8} "
            f"{'seen':>11}  target"
        )
        for label, key, target in (
            ("write → searchable", "searchable_ms", SEARCH_P95_TARGET_MS),
            ("write → webhook received", "webhook_ms", HOOK_P95_TARGET_MS),
        ):
            d = ev[key]
            ok = d["p95"] <= target
            add(
                f"   {label:<34} {cells(d)} {d['n']:>5}/{d['total']:<5}  p95 <= {target:.0f} ms: "
                f"{verdict(ok)}"
            )
        add(f"   {'server side, from the event (MongoDB)':<34}")
        for label, key in (
            ("→ relay enqueued (web)", "relay_enqueued_ms"),
            ("→ search entry written", "indexed_ms"),
            ("→ analytics folded", "analytics_ms"),
            ("→ webhook delivered", "delivered_ms"),
        ):
            d = srv[key]
            add(f"   {label:<34} {cells(d)} {d['n']:>5}/{d['total']:<5}")
        if ev["searchable_ms"]["n"] < ev["acked"] or ev["webhook_ms"]["n"] < ev["acked"]:
            add(
                f"   unseen = not observed within the run ({ev['observed_s']:.0f} s from the "
                "first send), counted as infinitely late"
            )
        add(
            f"   events fully processed (searchable + delivered): {ev['processed']} at "
            f"{ev['processed_rate']:.1f}/s (first send → last effect); still pending when the last "
            f"write was acknowledged: {ev['backlog_at_last_ack']}"
        )
        add(
            f"   analytics folded {srv['analytics_folded']}/{srv['events']}; deliveries "
            f"{srv['deliveries']} ({srv['deliveries_retried']} needed a retry); receiver: "
            f"{ev['receiver']['duplicates']} duplicate(s), {ev['receiver']['bad_signatures']} bad "
            f"signature(s); unique-word search {ev['spot_check']['found']}/"
            f"{ev['spot_check']['checked']}"
        )
        add(
            f"   search polling: {ev['searches']} searches ({ev['search_rate']:.0f}/s, at most "
            f"{self.opts.poll_rate:g}/s, one per pending {SLOT_SECONDS * 1000:.0f} ms slot; 2 "
            f"MongoDB queries each = {self.poll_share(ev):.0%} of the operations), median "
            f"re-poll of a slot {ev['repoll_ms_p50']:.0f} ms (the resolution of write → "
            f"searchable); errors {ev['search_errors'] or 0}"
        )
        ops = ev["mongo_ops"]
        if ops and ev["acked"]:
            total = sum(ops.values())
            add(
                f"   MongoDB operations over the load (server counters, all clients): {total} = "
                f"{total / ev['acked']:.1f} per task ("
                + ", ".join(f"{k} {v / ev['acked']:.1f}" for k, v in ops.items() if v)
                + f"), {ev['mongo_ops_rate']:.0f} operations/s"
            )
        add(
            f"   worker throughput: {ev['worker_messages']} actor messages done in "
            f"{ev['observed_s']:.0f} s = {ev['worker_msg_rate']:.0f} messages/s (5 per task: "
            f"{ev['offered_rate'] * 5:g}/s would keep up with the offered rate)"
        )
        left = {q: n for q, n in ev["left_in_queues"].items() if n}
        add(
            f"   left when the run ended: {ev['outbox_pending']} event(s) in the outbox, "
            + (", ".join(f"{n} message(s) on {q}" for q, n in left.items()) or "queues empty")
        )
        cores = ev["cpu_cores"]
        add(
            "   cores busy over the load: "
            + ", ".join(f"{k} {v:.2f}" for k, v in cores.items())
            + f" (of {os.cpu_count()})"
        )
        add(
            f"   worker process RSS after the run {ev['worker_rss_mb']:.1f} MB (peak "
            f"{ev['worker_hwm_mb']:.1f}), target <= {RSS_LIMIT_MB:.0f} MB: "
            f"{verdict(ev['worker_rss_mb'] <= RSS_LIMIT_MB)}; web process {ev['web_rss_mb']:.1f} MB"
        )
        errs = ev["log_errors"]
        count = len(errs["web"]) + len(errs["worker"])
        sample = (errs["worker"] + errs["web"])[:1]
        add(f"   error lines in the logs: {count}" + (f" (first: {sample[0]})" if sample else ""))

    @staticmethod
    def poll_share(ev: dict[str, Any]) -> float:
        """The share of MongoDB operations the search polling caused (2 queries a search)."""
        total = sum(ev["mongo_ops"].values())
        return 2 * ev["searches"] / total if total else math.nan

    def report_ladder(self, add: Callable[[str], None]) -> None:
        """Section 2b: the rate ladder."""
        ladder = self.results["ladder"]
        add("")
        add(
            f"2b. Rate ladder: {ladder['seconds']:g} s of writes per step, rates rising until a "
            "step misses (a p95 target, or the web acknowledging < 95 % of the rate)"
        )
        add(
            f"   {'writes/s':>8} {'acked/s':>8} {'searchable p95':>14} {'webhook p95':>12} "
            f"{'worker msg/s':>12} {'mongo op/s':>10} {'op/task':>8} {'mongo cores':>11}  verdict"
        )
        for st in ladder["steps"]:
            add(
                f"   {st['offered_rate']:>8g} {st['ack_rate']:>8.1f} "
                f"{ms(st['searchable_ms']['p95']):>14} {ms(st['webhook_ms']['p95']):>12} "
                f"{st['worker_msg_rate']:>12.0f} {st['mongo_ops_rate']:>10.0f} "
                f"{st['mongo_ops_per_task']:>8.1f} {st['cpu_cores'].get('mongo', 0):>11.2f}  "
                f"{verdict(st['pass'])}"
            )
        passed = [st["offered_rate"] for st in ladder["steps"] if st["pass"]]
        add(
            "   the targets held up to "
            + (f"{max(passed):g} writes/s" if passed else "none of the rates tried")
            + " on this machine"
        )

    def report_targets(self, add: Callable[[str], None]) -> None:
        """Section 3: every target in one place."""
        add("")
        add("3. Targets")
        res = self.results
        rows: list[tuple[str, str, bool]] = []
        ratio = res.get("noop", {}).get("ratio", {})
        if "ours_async" in ratio:
            r = ratio["ours_async"]
            rows.append(
                ("no-op msgs/s through our set-up >= 90 % of bare", f"{r:.0%}", r >= NOOP_TARGET)
            )
        if "ours_sync" in ratio:
            r = ratio["ours_sync"]
            rows.append(
                ("  (sync no-op through our set-up, for reference)", f"{r:.0%}", r >= NOOP_TARGET)
            )
        rss = [r.rss_mb for r in self.runs if r.variant.startswith("ours") and r.rss_mb > 0]
        if rss:
            rows.append(
                (
                    "no-op worker process RSS <= 100 MB",
                    f"{max(rss):.1f} MB",
                    max(rss) <= RSS_LIMIT_MB,
                )
            )
        ev = res.get("events")
        if ev:
            at = f" at {ev['offered_rate']:g} writes/s"
            s, h = ev["searchable_ms"], ev["webhook_ms"]
            rows.append(
                (
                    f"write → searchable p95 <= 1 s{at}",
                    ms(s["p95"]).strip(),
                    s["p95"] <= SEARCH_P95_TARGET_MS,
                )
            )
            rows.append(
                (
                    f"write → webhook received p95 <= 2 s{at}",
                    ms(h["p95"]).strip(),
                    h["p95"] <= HOOK_P95_TARGET_MS,
                )
            )
            rows.append(
                (
                    "events worker process RSS <= 100 MB",
                    f"{ev['worker_rss_mb']:.1f} MB",
                    ev["worker_rss_mb"] <= RSS_LIMIT_MB,
                )
            )
            if ev["ack_rate"] < 0.95 * ev["offered_rate"]:
                self.notes.append(
                    f"the web process acknowledged {ev['ack_rate']:.0f} writes/s of the "
                    f"{ev['offered_rate']:g} offered: the workers never saw the target rate, and "
                    "the latencies above are from each 201, not from the send"
                )
            if ev["offered_rate"] < EVENTS_RATE_TARGET:
                self.notes.append(
                    f"events were offered at {ev['offered_rate']:g}/s, below the target's "
                    f"{EVENTS_RATE_TARGET:g}/s: the latency verdicts are for that rate only"
                )
        for label, value, ok in rows:
            add(f"   {label:<58} {value:>10}  {verdict(ok)}")
        imports = res.get("imports", {})
        if "error" in imports:
            add(f"   a worker's RSS by import step: failed ({imports['error'][-300:]})")
        elif imports:
            add(
                "   a worker's RSS by import step (fresh interpreter; the last step builds the "
                f"broker as workers.entry does; {imports['total_mb']:.1f} MB at the end):"
            )
            for step in imports["steps"]:
                add(f"     {step['mb']:>6.1f} MB  {step['modules']:>4} modules  {step['step']}")
        for note in self.notes:
            add(f"   note: {note}")

    def report_profiles(self, add: Callable[[str], None]) -> None:
        """Section 4: what the instrumented workers spent their time and CPU on."""
        add("")
        add(
            "4. Diagnostics: separate runs of the same workload on an instrumented worker "
            "(bench/worker_profile.py); cProfile runs per thread on each thread's CPU clock and "
            "slows Python down, so read its shares, not its times"
        )
        for name, prof in self.results["profiles"].items():
            add("")
            if "error" in prof:
                add(f"   {name}: {prof['error']}")
                continue
            units, unit = prof["units"] or 1, prof["unit"]
            add(f"   {name}: {prof['units']} {unit}s in {prof['seconds']:.1f} s")
            if "run" in prof:
                r = prof["run"]
                add(
                    f"   this run: {r['offered_rate']:g} writes/s offered, {r['acked']} written; "
                    f"searchable p95 {ms(r['searchable_ms']['p95']).strip()}, webhook p95 "
                    f"{ms(r['webhook_ms']['p95']).strip()}"
                )
            threads = sorted(prof["threads_cpu_s"].items(), key=lambda kv: -kv[1])
            cpu_total = sum(v for _k, v in threads) or 1e-9
            add(
                f"   worker CPU {cpu_total:.2f} s = {cpu_total / units * 1e6:.0f} us per {unit}, "
                "by thread: " + ", ".join(f"{k} {v:.2f}s" for k, v in threads)
            )
            if prof.get("actors") and unit == "message":
                for actor, a in prof["actors"].items():
                    add(
                        f"   {actor}: {a['run_ms'] / max(a['messages'], 1) * 1000:.0f} us per "
                        "message from before_process_message to after_process_message (wall)"
                    )
            elif prof.get("actors"):
                add(
                    f"   {'actor':<28} {'msgs':>6} {'run ms/msg':>10} {'wait ms/msg':>11} "
                    f"{'max wait ms':>11}"
                )
                for actor, a in sorted(prof["actors"].items(), key=lambda kv: -kv[1]["run_ms"]):
                    n = a["messages"] or 1
                    add(
                        f"   {actor:<28} {a['messages']:>6} {a['run_ms'] / n:>10.1f} "
                        f"{a['wait_ms'] / n:>11.1f} {a['max_wait_ms']:>11.0f}"
                    )
            if prof.get("mongo"):
                total_ms = sum(m["ms"] for m in prof["mongo"].values())
                count = sum(m["commands"] for m in prof["mongo"].values())
                add(
                    f"   MongoDB from the worker: {count} commands "
                    f"({count / units:.1f} per {unit}), {total_ms / max(count, 1):.1f} ms each "
                    f"on average; by command (per {unit}, mean ms): "
                    + ", ".join(
                        f"{k} {m['commands'] / units:.1f}x {m['ms'] / max(m['commands'], 1):.1f}"
                        for k, m in sorted(prof["mongo"].items(), key=lambda kv: -kv[1]["ms"])
                    )
                )
            if "packages" in prof:
                total = prof["cpu_s"] or 1e-9
                add(
                    f"   cProfile: {prof['cpu_s']:.2f} CPU s in completed calls (the thread clocks "
                    f"above: {cpu_total:.2f} s)"
                )
                add(
                    "   self CPU by package: "
                    + ", ".join(
                        f"{k} {v / total:.0%}" for k, v in list(prof["packages"].items())[:12]
                    )
                )
                add("   top functions by self CPU:")
                for f in prof["top_self"][:12]:
                    add(f"     {f['self_s'] / total:>5.1%} {f['calls']:>9} calls  {f['fn']}")
                if prof["ours_cumulative"]:
                    add("   our code by cumulative CPU:")
                    for f in prof["ours_cumulative"][:8]:
                        add(f"     {f['cum_s'] / total:>5.1%} {f['calls']:>9} calls  {f['fn']}")
            if "rate_instrumented" in prof:
                add(f"   (drained at {prof['rate_instrumented']:.0f} msgs/s instrumented)")


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (recursively)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def package_of(file: str, name: str) -> str:
    """Which package a profiled function belongs to (ours are ``ours:<folder>``)."""
    if file == "~" or file.startswith("<"):
        return "builtins"
    path = Path(file)
    parts = path.parts
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1].split(".")[0]
    root = Path(__file__).resolve().parent.parent
    try:
        rel = path.resolve().relative_to(root)
        return f"ours:{rel.parts[0]}"
    except ValueError:
        pass
    if "lib" in parts:
        i = len(parts) - 1 - parts[::-1].index("lib")
        rest = parts[i + 2 :] if len(parts) > i + 2 else parts[-1:]
        return "stdlib:" + rest[0].removesuffix(".py")
    return path.name


def fn_label(key: tuple[str, int, str]) -> str:
    """``package/file.py:line(function)`` for a profile entry."""
    file, line, name = key
    if file == "~":
        return name
    parts = Path(file).parts
    short = "/".join(parts[-2:]) if len(parts) >= 2 else file
    return f"{short}:{line}({name})"


def parse(argv: list[str]) -> Options:
    """Command-line options of ``python -m bench workers``."""
    ap = argparse.ArgumentParser(prog="python -m bench workers", description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=10_000, help="no-op messages per run")
    ap.add_argument("--rounds", type=int, default=3, help="no-op rounds (variants interleaved)")
    ap.add_argument("--threads", type=int, default=8, help="worker threads (--threads)")
    ap.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help="no-op variants (comma-separated: " + ",".join(VARIANTS) + ")",
    )
    ap.add_argument("--rate", type=float, default=EVENTS_RATE_TARGET, help="writes/s offered")
    ap.add_argument("--seconds", type=float, default=15.0, help="how long writes are offered")
    ap.add_argument(
        "--drain-timeout", type=float, default=30.0, help="wait for effects after the last write"
    )
    ap.add_argument("--pollers", type=int, default=2, help="concurrent search pollers")
    ap.add_argument(
        "--poll-rate", type=float, default=40.0, help="searches/s at most, all pollers together"
    )
    ap.add_argument(
        "--profile",
        choices=("auto", "always", "never"),
        default="auto",
        help="profile the worker when a target is missed (auto), always, or never",
    )
    ap.add_argument(
        "--profile-seconds", type=float, default=4.0, help="writes offered per diagnostic run"
    )
    ap.add_argument(
        "--ladder",
        default=",".join(f"{r:g}" for r in DEFAULT_LADDER),
        help="writes/s of the ladder steps, climbed until one misses ('' for none)",
    )
    ap.add_argument("--ladder-seconds", type=float, default=5.0, help="writes per ladder step")
    ap.add_argument("--only", choices=("noop", "events"), default=None, help="run one section only")
    ap.add_argument(
        "--out", type=Path, default=RESULTS / "workers-latest.txt", help="report file ('-': none)"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    ns = ap.parse_args(argv)
    variants = tuple(v for v in ns.variants.split(",") if v)
    unknown = set(variants) - set(VARIANTS)
    if unknown or not variants:
        ap.error(f"--variants: unknown {', '.join(sorted(unknown)) or '(none given)'}")
    if ns.messages < 10 or ns.rounds < 1 or ns.rate <= 0 or ns.seconds <= 0:
        ap.error("--messages >= 10, --rounds >= 1, --rate > 0 and --seconds > 0")
    return Options(
        messages=ns.messages,
        rounds=ns.rounds,
        threads=ns.threads,
        variants=variants,
        rate=ns.rate,
        seconds=ns.seconds,
        drain_timeout=ns.drain_timeout,
        pollers=ns.pollers,
        poll_rate=ns.poll_rate,
        profile=ns.profile,
        profile_seconds=ns.profile_seconds,
        ladder=tuple(float(r) for r in ns.ladder.split(",") if r.strip()),
        ladder_seconds=ns.ladder_seconds,
        sections=(ns.only,) if ns.only else ("noop", "events"),
        out=None if str(ns.out) == "-" else ns.out,
        json_out=ns.json,
    )


def main(argv: list[str]) -> int:
    """Run the worker benchmark; print the report and write it to the results file."""
    opts = parse(argv)
    bench = WorkerBench(opts)
    report = bench.run()
    publish(report, opts.out)
    if opts.json_out is not None:
        # Strict JSON: no NaN or Infinity (an unseen task's latency is null).
        write_json(opts.json_out, json.dumps(finite(bench.results), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
