"""The fairness benchmark (issue 13): one user's burst beside another user's writes, and 100
users with bursts of different sizes, with fair dispatch on and off side by side in one run.

What runs (all on loopback, all started and stopped here): SecantusDB in memory (a fresh one per
mode: one mode run twice on one server drained 78.1 s then 85.1 s, the second 9 % slower) and
Redis (the machine's on 6379 under a unique key prefix, else a private ``redis-server``); for
each mode
(``FAIR_SHARE=false``, then ``true``) a fresh database and prefix, a real ``taskmanager web``
(which runs the outbox relay) and two ``taskmanager worker`` processes split as deployed (the
general queues on 4 threads; the webhook pool on 8), and a webhook receiver in this process.

Per mode:

* **idle**: user B (a real account with a webhook) creates ``--idle-probes`` tasks one by
  one; per task the write's acknowledgement → the first ``GET /search`` that returns it, and
  → its webhook received;
* **burst**: user A (with a webhook too) writes ``--burst`` tasks through
  ``core.tasks.create`` (the API's write path, 16 at a time); as soon as they are written,
  B creates ``--probes`` tasks one second apart, measured as when idle. A's drain time: from
  A's first write to A's last webhook received;
* **many users**: ``--users`` users (no webhooks) write bursts of different sizes (1 up to
  ``--max-burst``, quadratic spread), each user's burst written as a block, users in random
  order; completion delay of a task = its search entry's ``indexed_at`` minus its
  ``created_at`` (MongoDB's timestamps). Jain's index ``(Σx)² / (n·Σx²)`` (1 = all alike)
  over two per-user figures: the mean completion delay of the user's tasks, and the user's
  *slowdown*, its burst's completion delay (first write → last task indexed) per task of the
  burst.

Why two. Processor sharing is the textbook fair policy, and what makes it fair is that every
job's slowdown is the same whatever its size (Wierman and Harchol-Balter, "Classifying
scheduling policies with respect to unfairness", SIGMETRICS 2003): Jain over the slowdown is
the fairness figure, and round-robin raises it. Jain over the raw mean delay is the highest
when every user waits the same time however little it asked for, which is what FIFO does
with writes that arrive interleaved; serving a one-task user before a 25-task user (the very
point of fair share, and of the B-during-A's-burst targets) necessarily lowers it. The report
prints both indexes for the ideal FIFO (users' blocks in the run's write order) and the ideal
round-robin on the same bursts (:func:`model`), so the measured figures can be read against
what each policy can reach.

Repeats (``--rounds N``): the modes run N times each, alternated (off, on, on, off, ...), each
on a fresh store; B's probes are pooled, A's drain growth is the median over the pairs of runs
that ran one after the other (one pair's figure moved from -3.5 % to +10.9 % between runs of
one morning), times are the runs' median and Jain's indexes their mean.

Targets (reported, never asserted): during A's burst, B's write → searchable and write →
webhook p95 ≤ 2 x idle p95 + 1 s; A's drain time grows ≤ 10 % with fairness on; Jain ≥ 0.9
with fairness on, over the slowdown and (as the issue words it) over the raw mean delay.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import string
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bench.pipeline import mongo_cpu, mongo_ops
from bench.procs import (
    Child,
    Services,
    clean_env,
    cpu_model,
    publish,
    taskmanager_exe,
    tree_cpu,
    wait_http,
    write_json,
)
from bench.workers import finite, log_errors
from cli.embedded import free_port
from config.connections import Connections
from config.settings import Settings
from core import tasks
from core.context import open_context
from core.task_models import TaskCreate

API = "/api/v1"
SECRET = "bench-secret-" + "f" * 40
PASSWORD = "bench password 1"
RESULTS = Path(__file__).resolve().parent / "results"
P95_FACTOR, P95_SLACK_S = 2.0, 1.0
DRAIN_GROWTH_TARGET = 0.10
JAIN_TARGET = 0.9
MODES = ("off", "on")
#: A probe's effect not seen within this many seconds is given up (unseen).
PROBE_LIMIT_S = 60.0


@dataclass
class Options:
    """Command-line settings of one run."""

    burst: int = 2000
    probes: int = 10
    idle_probes: int = 5
    users: int = 100
    max_burst: int = 25
    window: int = Settings.model_fields["fair_share_window"].default
    #: FAIR_SHARE_BUDGET of the "on" mode (0: none, the product's default).
    budget: int = 0
    timeout: float = 1200.0
    seed: int = 13
    #: Runs of each mode, alternated off/on, on/off, ... (each on a fresh store).
    rounds: int = 1
    out: Path | None = RESULTS / "fairness-latest.txt"
    json_out: Path | None = None


@dataclass
class ModeResult:
    """What one mode measured (seconds)."""

    mode: str
    idle_search: list[float] = field(default_factory=list)
    idle_hook: list[float] = field(default_factory=list)
    burst_search: list[float] = field(default_factory=list)
    burst_hook: list[float] = field(default_factory=list)
    burst_written_s: float = math.nan
    a_drain_s: float = math.nan
    #: A's drain given up after this many seconds (``--timeout`` / 2), not over.
    a_drain_unfinished_s: float = math.nan
    a_waiting_at_probes: int = 0
    #: Over A's burst (first write to last webhook): the store's operations (all clients) and
    #: each process's CPU seconds, to tell where the drain's time went.
    a_drain_ops: int = 0
    a_drain_cpu: dict[str, float] = field(default_factory=dict)
    jain_delay: float = math.nan
    jain_slowdown: float = math.nan
    users_mean_delay_s: dict[str, float] = field(default_factory=dict)
    #: The write order of the users' blocks (indexes into the burst sizes).
    write_order: list[int] = field(default_factory=list)
    many_drain_s: float = math.nan
    errors: list[str] = field(default_factory=list)


def p95(values: list[float]) -> float:
    """The 95th percentile (nearest rank), an unseen probe (NaN) counting as infinitely late;
    NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(math.inf if math.isnan(v) else v for v in values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def jain(values: list[float]) -> float:
    """Jain's fairness index of ``values``: 1 when all are equal, 1/n when one takes all."""
    if not values or not any(values):
        return math.nan
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


def model(sizes: list[int], order: list[int]) -> dict[str, tuple[float, float]]:
    """Jain over (mean delay, slowdown) per user for ideal policies serving one task per
    time unit, every burst written at time 0 in ``order``: ``fifo`` (blocks in write order)
    and ``round-robin`` (one task per user with tasks left, in write order, in turn)."""
    done: dict[str, dict[int, list[int]]] = {"fifo": {}, "round-robin": {}}
    clock = 0
    for user in order:
        done["fifo"][user] = list(range(clock + 1, clock + sizes[user] + 1))
        clock += sizes[user]
    left, clock = {u: sizes[u] for u in order}, 0
    while any(left.values()):
        for user in order:
            if left[user]:
                clock += 1
                left[user] -= 1
                done["round-robin"].setdefault(user, []).append(clock)
    return {
        policy: (
            jain([sum(t) / len(t) for t in times.values()]),
            jain([max(t) / sizes[u] for u, t in times.items()]),
        )
        for policy, times in done.items()
    }


def mean(values: list[float]) -> float:
    """The mean of the finite values (NaN: none; a failed run has none)."""
    finite_values = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite_values) if finite_values else math.nan


def run_order(rounds: int) -> list[str]:
    """The modes in the order they run: off, on, then on, off, ... (ABBA), so that a drift of
    the machine over the run weighs on both modes alike."""
    return [m for r in range(rounds) for m in (MODES if r % 2 == 0 else MODES[::-1])]


def middle(values: list[float]) -> float:
    """The median of the finite values (NaN: none)."""
    finite_values = [v for v in values if not math.isnan(v)]
    return statistics.median(finite_values) if finite_values else math.nan


def drain_time(result: ModeResult) -> tuple[float, str]:
    """A's drain time and ``""``, or how long it was waited for and ``">"`` when it was given
    up (NaN: the mode failed before)."""
    if not math.isnan(result.a_drain_s):
        return result.a_drain_s, ""
    if not math.isnan(result.a_drain_unfinished_s):
        return result.a_drain_unfinished_s, ">"
    return math.nan, ""


def drain_cell(result: ModeResult) -> str:
    """A's drain time as a report shows it: ``52.0``, ``>600.0`` (given up) or ``-``."""
    seconds, sign = drain_time(result)
    return "-" if math.isnan(seconds) else f"{sign}{seconds:.1f}"


def merge(mode: str, runs: list[ModeResult]) -> ModeResult:
    """One mode's runs as one: probes pooled (their p95 is over all of them), timings the
    median of the runs', Jain's indexes and the usage over A's drain the mean."""
    if len(runs) <= 1:
        return runs[0] if runs else ModeResult(mode)
    out = ModeResult(mode)
    for run in runs:
        out.idle_search += run.idle_search
        out.idle_hook += run.idle_hook
        out.burst_search += run.burst_search
        out.burst_hook += run.burst_hook
        out.users_mean_delay_s.update(run.users_mean_delay_s)
        out.errors += run.errors
        for name, seconds in run.a_drain_cpu.items():
            out.a_drain_cpu[name] = out.a_drain_cpu.get(name, 0.0) + seconds / len(runs)
    out.write_order = runs[0].write_order
    out.burst_written_s = middle([r.burst_written_s for r in runs])
    out.a_drain_s = middle([r.a_drain_s for r in runs])
    out.a_drain_unfinished_s = max((r.a_drain_unfinished_s for r in runs), default=math.nan)
    out.many_drain_s = middle([r.many_drain_s for r in runs])
    out.a_waiting_at_probes = round(middle([r.a_waiting_at_probes for r in runs]))
    out.a_drain_ops = round(sum(r.a_drain_ops for r in runs) / max(1, len(runs)))
    out.jain_delay = mean([r.jain_delay for r in runs])
    out.jain_slowdown = mean([r.jain_slowdown for r in runs])
    return out


def burst_sizes(users: int, largest: int) -> list[int]:
    """Burst sizes from 1 to ``largest``, spread quadratically (many small, a few large)."""
    if users == 1:
        return [largest]
    return [1 + round((largest - 1) * (i / (users - 1)) ** 2) for i in range(users)]


def word() -> str:
    """A word no other task has (letters only)."""
    return "zf" + "".join(random.choices(string.ascii_lowercase, k=10))


class Receiver:
    """A webhook receiver on loopback: when each path got its requests (monotonic), by task."""

    def __init__(self) -> None:
        self.got: dict[str, list[tuple[float, str]]] = {}
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Listen on a free loopback port."""
        app = web.Application()
        app.router.add_post("/{name}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        task_id = str(body.get("data", {}).get("task", {}).get("id"))
        self.got.setdefault(request.match_info["name"], []).append((time.monotonic(), task_id))
        return web.Response(text="ok")

    def first(self, name: str, task_id: str) -> float | None:
        """When ``name`` first got the delivery of ``task_id``."""
        return next((at for at, tid in self.got.get(name, []) if tid == task_id), None)

    async def close(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()


class Stack:
    """One mode's processes and clients."""

    def __init__(self, bench: FairnessBench, mode: str):
        self.bench = bench
        self.mode = mode
        svc = bench.services
        tag = f"{mode}{uuid.uuid4().hex[:6]}"
        self.db = f"{svc.db}_{tag}"
        self.prefix = f"{svc.prefix}{tag}:"
        self.env = clean_env(
            APP_ENV="production",
            HOST="127.0.0.1",
            MONGODB_URL=svc.mongo.url,
            MONGODB_DB=self.db,
            REDIS_URL=svc.redis_url,
            REDIS_PREFIX=self.prefix,
            JWT_SECRET=SECRET,
            ACCESS_TOKEN_TTL="3600",
            LOG_LEVEL="WARNING",
            RATE_LIMIT="1000000/minute",
            WEBHOOK_ALLOW_HOSTS="127.0.0.1",
            WORKER_METRICS_PORT="0",
            FAIR_SHARE="true" if mode == "on" else "false",
            FAIR_SHARE_WINDOW=str(bench.opts.window),
            FAIR_SHARE_BUDGET=str(bench.opts.budget if mode == "on" else 0),
        )
        self.settings = Settings(
            mongodb_url=svc.mongo.url,
            mongodb_db=self.db,
            redis_url=svc.redis_url,
            redis_prefix=self.prefix,
            jwt_secret=SECRET,
            log_level="WARNING",
        )
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.children: list[Child] = []
        self.http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Start web and the two worker pools; wait for the web to be ready."""
        exe, svc = taskmanager_exe(), self.bench.services
        general = ["-Q", "notifications", "-Q", "cache", "-Q", "search", "-Q", "analytics"]
        self.children = [
            svc.spawn(f"web-{self.mode}", [exe, "web", "--port", str(self.port)], self.env),
            svc.spawn(
                f"worker-{self.mode}",
                [exe, "worker", "-p", "1", "-t", "4", *general, "-Q", "maintenance"],
                self.env,
            ),
            svc.spawn(
                f"hooks-{self.mode}",
                [exe, "worker", "-p", "1", "-t", "8", "-Q", "webhooks"],
                self.env,
            ),
        ]
        await wait_http(self.children[0], f"{self.base}/readyz", timeout=60)
        self.http = aiohttp.ClientSession(
            base_url=self.base, timeout=aiohttp.ClientTimeout(total=15)
        )

    async def stop(self) -> None:
        """Stop the processes (their error lines are kept)."""
        if self.http is not None:
            await self.http.close()
        for child in self.children:
            await asyncio.to_thread(child.stop)

    async def call(self, method: str, path: str, token: str | None = None, body: Any = None) -> Any:
        """One API call; its JSON answer (raises on a non-2xx)."""
        assert self.http is not None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.http.request(method, path, json=body, headers=headers) as resp:
            text = await resp.text()
            if resp.status >= 300:
                raise RuntimeError(f"{method} {path}: {resp.status} {text[:300]}")
            return json.loads(text) if text else None

    async def account(self, name: str, hook_url: str | None) -> tuple[str, str]:
        """Register a user (with a webhook on task.created); returns (user id, token)."""
        body = {"email": f"{name}-{uuid.uuid4().hex[:6]}@example.com", "password": PASSWORD}
        answer = await self.call("POST", f"{API}/auth/register", body={**body, "name": name})
        token = answer["access_token"]
        if hook_url is not None:
            await self.call(
                "POST", f"{API}/webhooks", token, {"url": hook_url, "events": ["task.created"]}
            )
        return str(answer["user"]["id"]), token


class FairnessBench:
    """Runs both modes and reports them side by side."""

    def __init__(self, opts: Options):
        self.opts = opts
        self.services: Services
        self.results: dict[str, Any] = {"options": {k: str(v) for k, v in vars(opts).items()}}
        #: Every mode run, in the order they ran.
        self.runs: list[ModeResult] = []
        #: Each mode's runs merged (:func:`merge`).
        self.modes: dict[str, ModeResult] = {}

    def note(self, text: str) -> None:
        """Progress on stderr (the report goes to stdout)."""
        print(f"[fairness] {text}", file=sys.stderr, flush=True)

    def run(self) -> str:
        """Run both modes; returns the report."""
        random.seed(self.opts.seed)
        self.results["started_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        self.results["load_average_start"] = os.getloadavg()
        self.services = Services.start()
        try:
            self.results["services"] = (
                f"SecantusDB {version('SecantusDB')} in memory; Redis "
                f"{self.services.redis_version()} ({self.services.redis_source})"
            )
            asyncio.run(self._all_modes())
        finally:
            self.services.stop()
        self.results["load_average_end"] = os.getloadavg()
        self.modes = {m: merge(m, [r for r in self.runs if r.mode == m]) for m in MODES}
        self.results["runs"] = [vars(r) for r in self.runs]
        self.results["modes"] = {k: vars(v) for k, v in self.modes.items()}
        return self.report()

    async def _all_modes(self) -> None:
        order = run_order(self.opts.rounds)
        for i, mode in enumerate(order):
            result = ModeResult(mode)
            self.runs.append(result)
            if i:
                await asyncio.to_thread(self.services.fresh_store)
            self.note(f"fairness {mode} (run {i + 1} of {len(order)})")
            try:
                await asyncio.wait_for(self._mode(mode, result), self.opts.timeout)
            except Exception as exc:  # reported, the other mode still runs
                result.errors.append(f"{type(exc).__name__}: {exc} ({_where(exc)})"[:500])

    async def _mode(self, mode: str, result: ModeResult) -> None:
        receiver = Receiver()
        await receiver.start()
        stack = Stack(self, mode)
        try:
            await stack.start()
            hooks = f"http://127.0.0.1:{receiver.port}"
            user_a, _ = await stack.account("a", f"{hooks}/a")
            _, token_b = await stack.account("b", f"{hooks}/b")
            for _ in range(self.opts.idle_probes):
                search, hook = await self._probe(stack, receiver, token_b)
                result.idle_search.append(search)
                result.idle_hook.append(hook)
            await self._burst(stack, receiver, user_a, token_b, result)
            await self._many_users(stack, result)
        finally:
            await stack.stop()
            for child in stack.children:
                result.errors += log_errors(child)
            await receiver.close()

    async def _probe(self, stack: Stack, receiver: Receiver, token: str) -> tuple[float, float]:
        """B writes one task; seconds to searchable and to its webhook (NaN: not within
        :data:`PROBE_LIMIT_S`)."""
        w = word()
        task = await stack.call("POST", f"{API}/tasks", token, {"title": f"probe {w}"})
        acked = time.monotonic()
        searchable = hook = math.nan
        while time.monotonic() - acked < PROBE_LIMIT_S and (
            math.isnan(searchable) or math.isnan(hook)
        ):
            if math.isnan(searchable):
                hits = await stack.call("GET", f"{API}/search?q={w}&limit=5", token)
                if any(h["task"]["id"] == task["id"] for h in hits["items"]):
                    searchable = time.monotonic() - acked
            at = receiver.first("b", task["id"])
            if at is not None and math.isnan(hook):
                hook = at - acked
            await asyncio.sleep(0.05)
        return searchable, hook

    async def _write(self, settings: Settings, work: list[str]) -> None:
        """Create one task per owner in ``work`` (in order, 16 at a time)."""
        gate = asyncio.Semaphore(16)
        async with open_context(settings, Connections(settings)) as ctx:

            async def one(i: int, owner: str) -> None:
                async with gate:
                    await tasks.create(ctx, owner, TaskCreate(title=f"bench item {i}"))

            await asyncio.gather(*(one(i, o) for i, o in enumerate(work)))

    async def _burst(
        self, stack: Stack, receiver: Receiver, user_a: str, token_b: str, result: ModeResult
    ) -> None:
        n = self.opts.burst
        ops_before, cpu_before = await self._usage(stack)
        started = time.monotonic()
        await self._write(stack.settings, [user_a] * n)
        result.burst_written_s = time.monotonic() - started
        self.note(f"{stack.mode}: A wrote {n} tasks in {result.burst_written_s:.1f} s")
        result.a_waiting_at_probes = n - len(receiver.got.get("a", []))
        for _ in range(self.opts.probes):
            probe_started = time.monotonic()
            search, hook = await self._probe(stack, receiver, token_b)
            result.burst_search.append(search)
            result.burst_hook.append(hook)
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - probe_started)))
        deadline = started + self.opts.timeout / 2
        while len({t for _, t in receiver.got.get("a", [])}) < n:
            if time.monotonic() > deadline:
                result.a_drain_unfinished_s = time.monotonic() - started
                raise RuntimeError(f"A's webhooks: {len(receiver.got.get('a', []))} of {n}")
            await asyncio.sleep(0.1)
        result.a_drain_s = max(at for at, _ in receiver.got["a"]) - started
        ops_after, cpu_after = await self._usage(stack)
        result.a_drain_ops = ops_after - ops_before
        result.a_drain_cpu = {k: round(v - cpu_before.get(k, 0.0), 1) for k, v in cpu_after.items()}
        self.note(f"{stack.mode}: A drained in {result.a_drain_s:.1f} s")

    async def _usage(self, stack: Stack) -> tuple[int, dict[str, float]]:
        """The store's operations so far (all clients) and CPU seconds of the store and of
        each of the mode's processes (a worker's forked Dramatiq processes included)."""
        async with open_context(stack.settings, Connections(stack.settings)) as ctx:
            ops = sum((await mongo_ops(ctx)).values())
        cpu = {"store": mongo_cpu(self.services)}
        for child in stack.children:
            cpu[child.name.rsplit("-", 1)[0]] = tree_cpu(child.pid)
        return ops, cpu

    async def _many_users(self, stack: Stack, result: ModeResult) -> None:
        sizes = burst_sizes(self.opts.users, self.opts.max_burst)
        owners = [f"u{i:03d}{uuid.uuid4().hex[:6]}" for i in range(len(sizes))]
        order = list(range(len(sizes)))
        random.shuffle(order)
        result.write_order = order
        work = [owners[i] for i in order for _ in range(sizes[i])]
        started = time.monotonic()
        await self._write(stack.settings, work)
        async with open_context(stack.settings, Connections(stack.settings)) as ctx:
            index = ctx.store["search_index"]
            deadline = started + self.opts.timeout / 2
            while await index.count_documents({"owner": {"$in": owners}}) < len(work):
                if time.monotonic() > deadline:
                    raise RuntimeError("the many users' tasks were not all indexed in time")
                await asyncio.sleep(0.5)
            result.many_drain_s = time.monotonic() - started
            created = {
                d["_id"]: d["created_at"]
                for d in await ctx.store["tasks"]
                .find({"owner": {"$in": owners}}, {"created_at": 1})
                .to_list()
            }
            delays: dict[str, list[float]] = {}
            first: dict[str, datetime] = {}
            last: dict[str, datetime] = {}
            async for d in index.find({"owner": {"$in": owners}}, {"owner": 1, "indexed_at": 1}):
                owner, made = str(d["owner"]), created[d["_id"]]
                delays.setdefault(owner, []).append((d["indexed_at"] - made).total_seconds())
                first[owner] = min(first.get(owner, made), made)
                last[owner] = max(last.get(owner, d["indexed_at"]), d["indexed_at"])
        means = {o: sum(v) / len(v) for o, v in delays.items()}
        size_of = dict(zip(owners, sizes, strict=True))
        result.users_mean_delay_s = means
        result.jain_delay = jain(list(means.values()))
        result.jain_slowdown = jain(
            [(last[o] - first[o]).total_seconds() / size_of[o] for o in delays]
        )
        self.note(
            f"{stack.mode}: Jain {result.jain_delay:.3f} (slowdown {result.jain_slowdown:.3f})"
        )

    # --- the report -----------------------------------------------------------------------

    def report(self) -> str:
        """The report: figures side by side, then the targets."""
        off, on = self.modes.get("off", ModeResult("off")), self.modes.get("on", ModeResult("on"))
        o = self.opts
        median = ", median" if o.rounds > 1 else ""
        drain_label = "A's drain time (s)" + median
        lines = [
            f"Fairness benchmark ({self.results.get('command', 'python -m bench fairness')})",
            f"started {self.results['started_at']}; {cpu_model()}; {os.cpu_count()} CPUs; "
            f"load average at start {self._load('start')}, at end {self._load('end')}",
            f"{self.results.get('services', '')}",
            f"per mode: web (relay) + worker (4 threads, general queues) + worker (8 threads, "
            f"webhooks); FAIR_SHARE_WINDOW={o.window}; FAIR_SHARE_BUDGET (on) "
            f"{o.budget or 'none'}"
            + (
                f"; {o.rounds} runs of each mode, alternated (off, on, on, off, ...), each "
                "on a fresh store: probes pooled, times the median, the rest the mean"
                if o.rounds > 1
                else ""
            ),
            "",
            f"1. B's write → effect, idle ({o.idle_probes}) and during A's {o.burst}-task burst "
            f"({o.probes} probes, 1 s apart), p95 in seconds",
            f"{'':34}{'fairness off':>14}{'fairness on':>14}",
        ]

        def row(label: str, a: float, b: float, fmt: str = "{:.2f}") -> str:
            def cell(v: float) -> str:
                if math.isinf(v):  # a probe unseen
                    return f">{PROBE_LIMIT_S:.0f}"
                return "-" if math.isnan(v) else fmt.format(v)

            return f"{label:34}{cell(a):>14}{cell(b):>14}"

        lines += [
            row("idle: write → searchable", p95(off.idle_search), p95(on.idle_search)),
            row("idle: write → webhook", p95(off.idle_hook), p95(on.idle_hook)),
            row("burst: write → searchable", p95(off.burst_search), p95(on.burst_search)),
            row("burst: write → webhook", p95(off.burst_hook), p95(on.burst_hook)),
            row(
                "A's webhooks waiting at probes",
                off.a_waiting_at_probes,
                on.a_waiting_at_probes,
                "{:.0f}",
            ),
            row("A's burst written (s)", off.burst_written_s, on.burst_written_s, "{:.1f}"),
            f"{drain_label:34}{drain_cell(off):>14}{drain_cell(on):>14}",
            *self._drain_runs(),
            row(
                "  store ops per A task",
                off.a_drain_ops / o.burst,
                on.a_drain_ops / o.burst,
                "{:.1f}",
            ),
            *(
                row(
                    f"  CPU s: {name}",
                    off.a_drain_cpu.get(name, math.nan),
                    on.a_drain_cpu.get(name, math.nan),
                    "{:.1f}",
                )
                for name in ("store", "web", "worker", "hooks")
            ),
            "",
            f"2. {o.users} users, bursts of 1 to {o.max_burst} tasks "
            f"({sum(burst_sizes(o.users, o.max_burst))} in all), write → search entry",
            f"{'':34}{'fairness off':>14}{'fairness on':>14}",
            row("Jain over per-user slowdown", off.jain_slowdown, on.jain_slowdown, "{:.3f}"),
            row("Jain over per-user mean delay", off.jain_delay, on.jain_delay, "{:.3f}"),
            row("all indexed after (s)", off.many_drain_s, on.many_drain_s, "{:.1f}"),
            row("smallest user's mean delay (s)", *self._user_delay(off, on, min)),
            row("largest user's mean delay (s)", *self._user_delay(off, on, max)),
            *self._model_rows(on),
            "",
            "3. Targets (fairness on)",
        ]
        for label, ok in self._targets(off, on):
            lines.append(f"  {'PASS' if ok else 'MISS'}  {label}")
        errors = off.errors + on.errors
        if errors:
            lines += ["", "Errors:"] + [f"  {e}" for e in errors[:20]]
        return "\n".join(lines) + "\n"

    def pairs(self) -> list[tuple[ModeResult, ModeResult]]:
        """The runs two by two as (off, on): each pair ran one after the other."""
        out = []
        for first, second in zip(self.runs[::2], self.runs[1::2], strict=False):
            by_mode = {first.mode: first, second.mode: second}
            out.append((by_mode.get("off", ModeResult("off")), by_mode.get("on", ModeResult("on"))))
        return out

    def drain_growths(self) -> list[tuple[float, str]]:
        """A's drain time with fairness on against off, per pair of runs: the growth and
        ``""`` when both drained, an upper bound and ``"<"`` when only the off mode's drain was
        given up (the on mode's was over before it), a lower bound and ``">"`` when only the
        on mode's was; NaN when neither drained."""
        out = []
        for off, on in self.pairs():
            (a, off_sign), (b, on_sign) = drain_time(off), drain_time(on)
            sign = {("", ""): "", (">", ""): "<", ("", ">"): ">"}.get((off_sign, on_sign))
            out.append((b / a - 1, sign) if sign is not None else (math.nan, ""))
        return out

    def drain_growth(self) -> tuple[float, str, bool]:
        """The median growth over the pairs of runs, its sign (as :meth:`drain_growths`) and
        whether it meets the target, counting a lower bound as no proof."""
        growths = self.drain_growths()
        value = middle([g for g, _ in growths])
        proven = middle([math.inf if s == ">" else g for g, s in growths])
        signs = {s for _, s in growths}
        sign = signs.pop() if len(signs) == 1 else ""
        return value, sign, proven <= DRAIN_GROWTH_TARGET

    def _drain_runs(self) -> list[str]:
        if self.opts.rounds <= 1:
            return []
        pairs = self.pairs()
        return [
            "  each pair of runs (off / on s, growth): "
            + "; ".join(
                f"{drain_cell(off)} / {drain_cell(on)}, {sign}{growth * 100:+.1f} %"
                for (off, on), (growth, sign) in zip(pairs, self.drain_growths(), strict=True)
            )
        ]

    def _load(self, when: str) -> str:
        value = self.results.get(f"load_average_{when}")
        return "-" if not value else "/".join(f"{x:.1f}" for x in value)

    def _user_delay(self, off: ModeResult, on: ModeResult, pick: Any) -> tuple[float, float]:
        sizes = burst_sizes(self.opts.users, self.opts.max_burst)
        target = pick(sizes)

        def of(result: ModeResult) -> float:
            # Owners are named u<index>...: the index gives the burst size.
            values = [
                m for o, m in result.users_mean_delay_s.items() if sizes[int(o[1:4])] == target
            ]
            return sum(values) / len(values) if values else math.nan

        return of(off), of(on)

    def _model_rows(self, on: ModeResult) -> list[str]:
        """What ideal policies give on the same bursts (see the module's docstring)."""
        if not on.write_order:
            return []
        sizes = burst_sizes(self.opts.users, self.opts.max_burst)
        figures = model(sizes, on.write_order)
        lines = ["", "   the same bursts under ideal policies (model, one task per time unit):"]
        lines.append(f"{'':34}{'slowdown':>14}{'mean delay':>14}")
        for policy, (delay, slowdown) in figures.items():
            lines.append(f"   {policy:31}{slowdown:>14.3f}{delay:>14.3f}")
        return lines

    def _targets(self, off: ModeResult, on: ModeResult) -> list[tuple[str, bool]]:
        out = []
        for name, idle, burst in (
            ("searchable", on.idle_search, on.burst_search),
            ("webhook", on.idle_hook, on.burst_hook),
        ):
            bound = P95_FACTOR * p95(idle) + P95_SLACK_S
            got = p95(burst)
            out.append(
                (
                    f"B's write → {name} p95 during the burst {got:.2f} s <= 2 x idle "
                    f"{p95(idle):.2f} s + 1 s = {bound:.2f} s",
                    got <= bound,
                )
            )
        growth, sign, met = self.drain_growth()
        of_pairs = " (median of the pairs of runs)" if self.opts.rounds > 1 else ""
        gave_up = (
            f"; a drain not over after {off.a_drain_unfinished_s:.0f} s counts as that long"
            if not math.isnan(off.a_drain_unfinished_s)
            else ""
        )
        out.append(
            (
                f"A's drain time grows {sign}{growth * 100:+.1f} %{of_pairs} "
                f"(<= {DRAIN_GROWTH_TARGET * 100:.0f} %{gave_up})",
                met,
            )
        )
        out.append(
            (
                f"Jain's index over per-user slowdown (burst completion delay per task) "
                f"{on.jain_slowdown:.3f} >= {JAIN_TARGET}",
                on.jain_slowdown >= JAIN_TARGET,
            )
        )
        sizes = burst_sizes(self.opts.users, self.opts.max_burst)
        ideal = model(sizes, on.write_order or list(range(len(sizes))))["round-robin"][0]
        out.append(
            (
                f"Jain's index over per-user mean completion delay {on.jain_delay:.3f} >= "
                f"{JAIN_TARGET} (ideal round-robin reaches {ideal:.3f} on these bursts: "
                "see the docstring)",
                on.jain_delay >= JAIN_TARGET,
            )
        )
        return out


def _where(exc: BaseException) -> str:
    """The innermost frame of this benchmark an error came through (``file:line in func``),
    so a failed mode says which of its steps failed."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/bench/" in f.filename]
    if not frames:
        return "outside the benchmark's code"
    f = frames[-1]
    return f"{Path(f.filename).name}:{f.lineno} in {f.name}"


def parse(argv: list[str]) -> Options:
    """Command-line options of ``python -m bench fairness``."""
    ap = argparse.ArgumentParser(
        prog="python -m bench fairness", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--burst", type=int, default=2000, help="A's tasks")
    ap.add_argument("--probes", type=int, default=10, help="B's writes during the burst")
    ap.add_argument("--idle-probes", type=int, default=5, help="B's writes when idle")
    ap.add_argument("--users", type=int, default=100, help="users of the many-users part")
    ap.add_argument("--max-burst", type=int, default=25, help="largest of their bursts")
    ap.add_argument(
        "--window",
        type=int,
        default=Options.window,
        help="FAIR_SHARE_WINDOW (the product's default unless given)",
    )
    ap.add_argument(
        "--budget", type=int, default=0, help="FAIR_SHARE_BUDGET with fairness on (0: none)"
    )
    ap.add_argument("--timeout", type=float, default=1200.0, help="bound of each mode (s)")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="runs of each mode, alternated, each on a fresh store (drain: median of the pairs)",
    )
    ap.add_argument(
        "--out", type=Path, default=RESULTS / "fairness-latest.txt", help="report ('-': none)"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    ns = ap.parse_args(argv)
    if min(ns.burst, ns.probes, ns.idle_probes, ns.users, ns.max_burst, ns.window, ns.rounds) < 1:
        ap.error("counts must be at least 1")
    if ns.budget < 0:
        ap.error("--budget must be 0 (none) or more")
    return Options(
        burst=ns.burst,
        probes=ns.probes,
        idle_probes=ns.idle_probes,
        users=ns.users,
        max_burst=ns.max_burst,
        window=ns.window,
        budget=ns.budget,
        timeout=ns.timeout,
        seed=ns.seed,
        rounds=ns.rounds,
        out=None if str(ns.out) == "-" else ns.out,
        json_out=ns.json,
    )


def command_line(argv: list[str]) -> str:
    """What to type to run the benchmark again as ``argv`` did, its output paths left out."""
    shown, args = [], iter(argv)
    for arg in args:
        if arg in ("--out", "--json"):
            next(args, None)  # and its value
        elif not arg.startswith(("--out=", "--json=")):
            shown.append(arg)
    return " ".join(["python -m bench fairness", *shown])


def main(argv: list[str]) -> int:
    """Run the fairness benchmark; print the report and write it to the results file."""
    opts = parse(argv)
    bench = FairnessBench(opts)
    bench.results["command"] = command_line(argv)
    report = bench.run()
    publish(report, opts.out)
    if opts.json_out is not None:
        write_json(opts.json_out, json.dumps(finite(bench.results), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
