"""The API benchmark: throughput and latency of the task endpoints beside the bare-aiohttp
ceiling and the raw store cost of the same queries, all measured in one run.

Measured: ``GET /tasks`` (the default first page, which the product serves from its cache),
``GET /tasks?status=todo`` (a page that goes to MongoDB), ``GET /tasks/{id}`` (random ids),
``GET /tasks/stats`` (a cache hit) and ``POST /tasks``, for a user with 500 tasks.

What runs (all on loopback, all started and stopped here):

* SecantusDB in memory, and Redis (the machine's on 6379 under a unique key prefix, else a
  private ``redis-server``); every key written is deleted at the end;
* ONE ``taskmanager web`` process (production settings, logs at WARNING, a rate limit high
  enough never to refuse: it still costs its Redis round trip, which is part of the cost);
* the ceiling: ``python -m bench.ceiling``, a bare aiohttp server in one process;
* the load: ``python -m bench.load`` processes holding 64 keep-alive connections in all,
  closed loop, a warm-up and then a measurement window per endpoint;
* the raw store cost: this process, with the product's own client factories (same pool
  sizes, same options), runs at the same concurrency the exact sequence of round trips each
  request makes: denylist ``EXISTS`` and rate-limit ``EVALSHA`` (every authenticated request),
  then the endpoint's queries. Writes go to a twin database with the same indexes, so the web
  process's outbox relay never sees them.

CPU is read per process (``/proc``, Redis ``INFO``) during every window, so the report says
which process was the bottleneck and how much other work on the machine disturbed the run.

Targets (reported, never asserted): ``GET /tasks/stats`` ≥ 50 % of the ceiling with p95 ≤
10 ms; every other endpoint ≥ 70 % of the lower of (ceiling, raw store); the web process ≤ 80 MB
RSS after the run. Then the cached reads again, in turns with the ceiling (``--share-rounds``,
:meth:`ApiBench.ceiling_share`): stats and the first page ≥ 35 % of the ceiling (the fast-path
issue), each round's windows side by side; and two web processes against one, each held to
the same CPU quota (``--scaling-cores``, bench/scaling.py).

Opt-in extras: ``--profile [KEYS]`` profiles endpoints in a fresh web process (cProfile on the
event-loop thread's CPU clock, see bench/webproc.py); ``--trials PATCHES`` measures trial
optimisations (bench/patches.py) end to end, each in its own web process, round-robin.
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
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

import aiohttp
from bson import ObjectId
from pymongo import DESCENDING

from bench import scaling
from bench.patches import ENV_PATCHES, PATCHES
from bench.procs import (
    Child,
    CpuSnapshot,
    Services,
    clean_env,
    cpu_model,
    product_env,
    product_settings,
    publish,
    python,
    rss_mb,
    taskmanager_exe,
    tree_cpu,
    until_quiet,
    wait_http,
    write_json,
)
from cli.embedded import free_port
from config.connections import Connections
from config.settings import Settings
from core import ratelimit
from core.security import Tokens
from core.store import Store

API = "/api/v1"
PATCH_NAMES = (*PATCHES, *ENV_PATCHES)
SECRET = "bench-secret-" + "b" * 40
PASSWORD = "bench password 1"
#: The fast-path issue's ceiling for the web process's RSS after the run.
RSS_LIMIT_MB = 90.0
#: The fast-path issue's floor for a cached read's share of the ceiling, in turns.
SHARE_TARGET = 0.35
#: The cached reads measured in turns with the ceiling.
SHARE_KEYS = ("stats", "list")
RESULTS = Path(__file__).resolve().parent / "results"

WORDS = [
    *("plan", "write", "review", "ship", "fix", "call", "email", "design", "test", "deploy"),
    *("budget", "report", "draft", "meet", "invoice", "update", "migrate", "clean", "refactor"),
]
TAGS = ["work", "home", "urgent", "later", "errand", "reading", "health", "money"]


# --------------------------------------------------------------------------------------------
# Measurements


@dataclass
class Measurement:
    """One load window: what was answered, how fast, and who used the CPU meanwhile."""

    name: str
    ok: int
    window: float
    latencies: list[float]
    errors: dict[str, int] = field(default_factory=dict)
    error_sample: str | None = None
    #: Cores busy during the window, per process group (web, mongo, redis, load, ...).
    cpu: dict[str, float] = field(default_factory=dict)
    #: Lookups of the cache the endpoint uses, by result (hit, miss, error), warm-up included.
    cache: dict[str, float] | None = None
    #: Cores the measured process and its children used over the load, warm-up included
    #: (set by :meth:`ApiBench.alternate`).
    tree_cores: float | None = None

    @property
    def hit_ratio(self) -> float | None:
        """Share of cache lookups that hit (None: not a cached endpoint)."""
        if self.cache is None:
            return None
        total = sum(self.cache.values())
        return self.cache.get("hit", 0) / total if total else 0.0

    @property
    def rps(self) -> float:
        """Successful answers per second."""
        return self.ok / self.window if self.window > 0 else 0.0

    @property
    def error_count(self) -> int:
        """Failed answers (wrong status, missing header, lost connection)."""
        return sum(self.errors.values())

    def pct(self, q: float) -> float:
        """A latency percentile in ms (nearest rank); NaN with no sample."""
        if not self.latencies:
            return math.nan
        lat = self.latencies
        return lat[min(len(lat) - 1, max(0, math.ceil(q / 100 * len(lat)) - 1))]

    def summary(self) -> dict[str, Any]:
        """A JSON-able digest."""
        return {
            "name": self.name,
            "rps": round(self.rps, 1),
            "ok": self.ok,
            "window_s": round(self.window, 3),
            "p50_ms": round(self.pct(50), 3),
            "p95_ms": round(self.pct(95), 3),
            "p99_ms": round(self.pct(99), 3),
            "errors": self.errors,
            "error_sample": self.error_sample,
            "cpu_cores": {k: round(v, 3) for k, v in self.cpu.items()},
            "cache_lookups": self.cache,
        }


def cpu_shares(a: CpuSnapshot, b: CpuSnapshot, groups: dict[str, str]) -> dict[str, float]:
    """Cores busy per group between two snapshots; ``other`` is the machine minus ours."""
    span = max(1e-9, b.at - a.at)
    out: dict[str, float] = {}
    for name, group in groups.items():
        used = b.procs.get(name, 0.0) - a.procs.get(name, 0.0)
        out[group] = out.get(group, 0.0) + used / span
    out["redis"] = (b.redis - a.redis) / span
    ours = sum(out.values())
    out["other"] = max(0.0, (b.machine - a.machine) / span - ours)
    return out


@dataclass
class Options:
    """Command-line settings of one run."""

    seconds: float = 5.0
    warmup: float = 1.0
    connections: int = 64
    clients: int = 1
    tasks: int = 500
    profile: str | None = None
    trials: list[str] = field(default_factory=list)
    trial_endpoints: list[str] = field(default_factory=lambda: ["list", "get", "stats"])
    trial_rounds: int = 3
    trial_seconds: float = 2.0
    #: Each web process's CPU quota in the scaling phase (bench/scaling.py); 0 skips it.
    scaling_cores: float = 0.5
    scaling_rounds: int = 2
    #: Rounds of the cached reads measured in turns with the ceiling (0 skips them).
    share_rounds: int = 3
    out: Path | None = RESULTS / "api-latest.txt"
    json_out: Path | None = None


# --------------------------------------------------------------------------------------------
# The workloads


@dataclass
class Endpoint:
    """One measured operation: its HTTP requests and the raw store work it does."""

    key: str
    label: str
    requests: list[str]
    ok: tuple[int, ...]
    raw: Callable[[int], Awaitable[None]]
    raw_queries: Callable[[int], Awaitable[None]]
    raw_desc: str
    expect_header: str | None = None
    #: The cache (core.cache name) this request should hit: checked in /metrics.
    cache: str | None = None


def task_body(rng: random.Random, now: datetime, i: int) -> dict[str, Any]:
    """A plausible task: a third overdue-ish, a third due in days, a third without a date."""
    body: dict[str, Any] = {
        "title": f"Task {i}: {rng.choice(WORDS)} the {rng.choice(WORDS)}",
        "description": " ".join(rng.choices(WORDS, k=12)),
        "status": rng.choice(["todo", "todo", "in_progress", "done"]),
        "priority": rng.choice(["low", "medium", "medium", "high", "urgent"]),
        "tags": rng.sample(TAGS, k=rng.randint(0, 3)),
    }
    r = rng.random()
    if r < 1 / 3:
        body["due_at"] = (now - timedelta(days=rng.uniform(1, 30))).isoformat()
    elif r < 2 / 3:
        # At least two days ahead: no task falls due during the run, so the stats cache
        # entry stays valid until midnight UTC (its other expiry).
        body["due_at"] = (now + timedelta(days=rng.uniform(2, 30))).isoformat()
    return body


def http_request(port: int, method: str, path: str, token: str, body: str | None = None) -> str:
    """Raw HTTP/1.1 request text (latin-1 safe: bodies here are ASCII JSON)."""
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        f"Authorization: Bearer {token}",
        "Accept: application/json",
    ]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body.encode())}"]
    return "\r\n".join(lines) + "\r\n\r\n" + (body or "")


class RawStore:
    """The store round trips each endpoint makes, without HTTP, validation or our code."""

    def __init__(self, settings: Settings, token: str, user_id: str, task_ids: list[str]):
        connections = Connections(settings)
        self.settings = settings
        self.mongo = connections.mongo()
        self.redis = connections.redis()
        self.db = self.mongo[settings.mongodb_db]
        self.twin = Store(self.mongo, settings.mongodb_db + "_raw")
        claims = Tokens(settings).decode(token, "access")
        p = settings.redis_prefix
        self.deny_keys = (f"{p}deny:jti:{claims.jti}", f"{p}deny:login:{claims.login_id}")
        self.rl_key = f"{p}ratelimit:raw-bench"
        self.policy = ratelimit.Policy.from_settings(settings)
        self.user_id = user_id
        self.oids = [ObjectId(t) for t in task_ids]
        self.stats_keys = (f"{p}gen:{user_id}", f"{p}cache:stats:{user_id}")
        self.first_page_keys = (f"{p}gen:{user_id}", f"{p}cache:first_page:{user_id}")
        self.raw_gen_key = f"{p}gen:raw-bench"
        self.rng = random.Random(7)

    async def setup(self) -> None:
        """Create the twin database's indexes."""
        await self.twin.ensure_indexes()

    async def close(self) -> None:
        """Close both clients."""
        await self.mongo.close()
        await self.redis.aclose()

    async def auth(self) -> None:
        """What every authenticated request does first: denylist, then rate limit."""
        await self.redis.exists(*self.deny_keys)
        decision = await ratelimit.hit(self.redis, self.rl_key, self.policy)
        if decision.degraded:
            raise RuntimeError("rate-limit round trip failed")

    async def first_page_q(self, i: int) -> None:
        """``GET /tasks`` (the default first page) on a cache hit: one MGET."""
        _, blob = await self.redis.mget(*self.first_page_keys)
        if blob is None:
            raise RuntimeError("first-page cache entry missing")

    async def list_q(self, i: int) -> None:
        """``GET /tasks?status=todo``: a page of 50 (+1 to know whether there is more) walking
        the ``owner_created`` index, as core.tasks hints it."""
        await (
            self.db["tasks"]
            .find({"owner": self.user_id, "status": "todo"})
            .sort([("created_at", DESCENDING), ("_id", DESCENDING)])
            .hint("owner_created")
            .limit(51)
            .to_list()
        )

    async def get_q(self, i: int) -> None:
        """``GET /tasks/{id}``: one task by ``_id`` alone, the owner compared after (as
        core.tasks.get does: SecantusDB leaves the ``_id`` index when the filter has more)."""
        doc = await self.db["tasks"].find_one({"_id": self.rng.choice(self.oids)})
        if doc is None or doc.get("owner") != self.user_id:
            raise RuntimeError("seeded task not found")

    async def create_q(self, i: int) -> None:
        """``POST /tasks``: task + event in one transaction, then the cache generation bump."""
        now = datetime.now(UTC)
        task_id = ObjectId()
        snapshot = {
            "id": str(task_id),
            "title": "Benchmark task",
            "description": "",
            "status": "todo",
            "priority": "high",
            "due_at": None,
            "tags": ["bench"],
            "created_at": now.isoformat(),
            "updated_at": now.isoformat(),
            "completed_at": None,
        }
        doc = {
            "_id": task_id,
            "owner": self.user_id,
            "title": "Benchmark task",
            "description": "",
            "status": "todo",
            "priority": "high",
            "due_at": None,
            "tags": ["bench"],
            "created_at": now,
            "updated_at": now,
            "version": 1,
            "completed_at": None,
            "due_key": datetime(9999, 12, 31, tzinfo=UTC),
            "priority_rank": 2,
        }
        event = {
            "_id": ObjectId(),
            "type": "task.created",
            "user_id": self.user_id,
            "actor_id": self.user_id,
            "subject_id": str(task_id),
            "data": {"task": snapshot},
            "created_at": now,
            "request_id": "raw",
            "pending": True,
        }

        async def work(session: Any) -> None:
            await self.twin["tasks"].insert_one(doc, session=session)
            await self.twin["events"].insert_many([event], session=session)

        await self.twin.transaction(work)
        await self.redis.incr(self.raw_gen_key)

    async def stats_q(self, i: int) -> None:
        """``GET /tasks/stats`` on a cache hit: one MGET of the generation and the value."""
        _, blob = await self.redis.mget(*self.stats_keys)
        if blob is None:
            raise RuntimeError("stats cache entry missing")

    def full(self, query: Callable[[int], Awaitable[None]]) -> Callable[[int], Awaitable[None]]:
        """The whole request's round trips: auth, then ``query``."""

        async def op(i: int) -> None:
            await self.auth()
            await query(i)

        return op


# --------------------------------------------------------------------------------------------
# The run


class ApiBench:
    """One run: start everything, seed, measure, report, stop everything."""

    def __init__(self, opts: Options, argv: list[str] | None = None):
        self.opts = opts
        self.argv = argv or []
        self.services: Services | None = None
        self.web: Child | None = None
        self.ceiling: Child | None = None
        self.web_port = free_port()
        self.ceiling_port = free_port()
        self.settings: Settings | None = None
        self.results: dict[str, Any] = {}
        self.rss_trail: list[tuple[str, float]] = []
        self.trial_rss: dict[str, tuple[float, float]] = {}
        self.login_email = ""

    def rss(self, when: str) -> None:
        """Note the web process's RSS now."""
        if self.web is not None and self.web.alive():
            self.rss_trail.append((when, rss_mb(self.web.pid)[0]))

    def note(self, text: str) -> None:
        """Progress, on stderr (the report goes to stdout and the results file)."""
        print(f"[bench api] {text}", file=sys.stderr, flush=True)

    # ---- processes -------------------------------------------------------------------------

    def web_env(self, services: Services) -> dict[str, str]:
        """The web process's environment (production settings)."""
        return product_env(services, SECRET)

    async def start(self) -> None:
        """Start the store servers, the web process and the ceiling."""
        self.note("starting SecantusDB, Redis, the web process and the ceiling")
        services = self.services = Services.start()
        env = self.web_env(services)
        self.settings = product_settings(services, SECRET)
        self.web = services.spawn(
            "web", [taskmanager_exe(), "web", "--port", str(self.web_port)], env
        )
        self.ceiling = services.spawn(
            "ceiling", [python(), "-m", "bench.ceiling", str(self.ceiling_port)], clean_env()
        )
        self.results["redis_url"] = services.redis_url
        self.results["redis_prefix"] = services.prefix
        self.results["redis_private"] = services.private_redis is not None
        self.results["services"] = (
            f"SecantusDB {version('SecantusDB')} in memory (embedded); Redis "
            f"{services.redis_version()} ({services.redis_source}), key prefix {services.prefix}"
        )
        await wait_http(self.web, f"http://127.0.0.1:{self.web_port}/readyz", timeout=60)
        await wait_http(self.ceiling, f"http://127.0.0.1:{self.ceiling_port}/", timeout=30)

    def stop(self) -> None:
        """Stop everything this run started and delete its Redis keys."""
        if self.services is not None:
            self.services.stop()
            self.services = None

    def pids(self) -> dict[str, int]:
        """Processes whose CPU is read, by name."""
        assert self.services is not None
        assert self.web is not None
        assert self.ceiling is not None
        proc = self.services.mongo.process
        assert proc is not None
        return {
            "web": self.web.pid,
            "ceiling": self.ceiling.pid,
            "mongo": proc.pid,
            "bench": os.getpid(),
        }

    # ---- seeding ---------------------------------------------------------------------------

    async def seed(self) -> tuple[str, str, list[str]]:
        """Register the measured user (and two others) over HTTP and create their tasks."""
        base = f"http://127.0.0.1:{self.web_port}{API}"
        rng = random.Random(42)
        now = datetime.now(UTC)
        started = time.monotonic()
        tag = os.urandom(4).hex()
        async with aiohttp.ClientSession() as http:

            async def register(who: str) -> tuple[str, str]:
                body = {"email": f"{who}-{tag}@example.com", "password": PASSWORD, "name": who}
                async with http.post(f"{base}/auth/register", json=body) as resp:
                    data = await resp.json()
                    if resp.status != 201:
                        raise RuntimeError(f"register answered {resp.status}: {data}")
                return str(data["access_token"]), str(data["user"]["id"])

            async def create(token: str, count: int) -> list[str]:
                ids: list[str] = []
                gate = asyncio.Semaphore(16)
                headers = {"Authorization": f"Bearer {token}"}

                async def one(i: int) -> None:
                    async with (
                        gate,
                        http.post(
                            f"{base}/tasks", json=task_body(rng, now, i), headers=headers
                        ) as resp,
                    ):
                        data = await resp.json()
                        if resp.status != 201:
                            raise RuntimeError(f"POST /tasks answered {resp.status}: {data}")
                        ids.append(str(data["id"]))

                await asyncio.gather(*(one(i) for i in range(count)))
                return ids

            token, user_id = await register("bench")
            self.login_email = f"bench-{tag}@example.com"
            others = [await register(f"other{k}") for k in range(2)]
            task_ids = await create(token, self.opts.tasks)
            for other_token, _ in others:
                await create(other_token, max(1, self.opts.tasks // 10))
        self.results["seed"] = {
            "tasks": self.opts.tasks,
            "other_users": 2,
            "other_tasks_each": max(1, self.opts.tasks // 10),
            "seconds": round(time.monotonic() - started, 2),
        }
        self.note(f"seeded {self.opts.tasks} tasks (+2 users with a tenth each)")
        return token, user_id, task_ids

    async def check(self, endpoint: Endpoint, token: str, port: int | None = None) -> None:
        """Send one request through aiohttp's own client and insist on a good answer; for an
        endpoint that expects a header (stats: ``X-Cache: hit``) the first request fills the
        cache and a second one must carry it."""
        text = endpoint.requests[0]
        head, _, body = text.partition("\r\n\r\n")
        method, path, _ = head.split("\r\n", 1)[0].split(" ")
        url = f"http://127.0.0.1:{port or self.web_port}{path}"
        headers = {"Authorization": f"Bearer {token}"}
        if body:
            headers["Content-Type"] = "application/json"
        async with aiohttp.ClientSession() as http:
            for attempt in range(2 if endpoint.cache else 1):
                async with http.request(method, url, data=body or None, headers=headers) as resp:
                    answer = await resp.text()
                    if resp.status not in endpoint.ok:
                        raise RuntimeError(
                            f"{endpoint.label} answered {resp.status}: {answer[:500]}"
                        )
                    if endpoint.expect_header and attempt == 1:
                        name, _, value = endpoint.expect_header.partition(": ")
                        if resp.headers.get(name) != value:
                            raise RuntimeError(
                                f"{endpoint.label}: expected {endpoint.expect_header!r}, got "
                                f"{name}: {resp.headers.get(name)!r}"
                            )

    # ---- load ------------------------------------------------------------------------------

    async def http_load(
        self,
        name: str,
        port: int,
        requests: list[str],
        *,
        ok: tuple[int, ...] = (200,),
        expect_header: str | None = None,
        on_mark: Callable[[], None] | None = None,
        on_stop: Callable[[], None] | None = None,
        cache: str | None = None,
        seconds: float | None = None,
    ) -> Measurement:
        """Drive ``requests`` at ``port`` from the load-generator processes; with ``cache``,
        count that cache's hits and misses (from /metrics) over the load."""
        assert self.services is not None
        lookups_before = await cache_lookups(port, cache) if cache else None
        n = max(1, min(self.opts.clients, self.opts.connections))
        share = [
            self.opts.connections // n + (1 if k < self.opts.connections % n else 0)
            for k in range(n)
        ]
        procs = []
        for k in range(n):
            proc = await asyncio.create_subprocess_exec(
                python(),
                "-m",
                "bench.load",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                cwd=str(Path(__file__).resolve().parent.parent),
                limit=1 << 26,
            )
            assert proc.stdin is not None
            config = {
                "host": "127.0.0.1",
                "port": port,
                "connections": share[k],
                "requests": requests,
                "ok": list(ok),
                "expect_header": expect_header,
                "seed": k,
            }
            proc.stdin.write((json.dumps(config) + "\n").encode())
            procs.append(proc)
        try:
            for proc in procs:
                assert proc.stdout is not None
                line = await asyncio.wait_for(proc.stdout.readline(), 30)
                if line.strip() != b"ready":
                    raise RuntimeError(f"load generator failed to start: {line!r}")

            async def say(word: str) -> None:
                for proc in procs:
                    assert proc.stdin is not None
                    proc.stdin.write(word.encode() + b"\n")
                await asyncio.gather(*(p.stdin.drain() for p in procs if p.stdin is not None))

            pids = self.pids() | {f"load{k}": p.pid for k, p in enumerate(procs)}
            groups = {key: ("load" if key.startswith("load") else key) for key in pids}
            await say("go")
            await asyncio.sleep(self.opts.warmup)
            before = self.services.snapshot(pids)
            await say("mark")
            if on_mark is not None:
                on_mark()
            await asyncio.sleep(seconds or self.opts.seconds)
            await say("stop")
            for proc in procs:
                assert proc.stdout is not None
                line = await asyncio.wait_for(proc.stdout.readline(), 60)
                if line.strip() != b"closed":
                    raise RuntimeError(f"load generator failed: {line!r}")
            after = self.services.snapshot(pids)
            if on_stop is not None:
                on_stop()
            outputs = []
            for proc in procs:
                assert proc.stdout is not None
                outputs.append(json.loads(await asyncio.wait_for(proc.stdout.read(), 60)))
                await proc.wait()
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        latencies: list[float] = []
        errors: dict[str, int] = {}
        sample = None
        for out in outputs:
            latencies += out["latencies_ms"]
            for kind, count in out["errors"].items():
                errors[kind] = errors.get(kind, 0) + count
            sample = sample or out["error_sample"]
        latencies.sort()
        window = sum(o["window"] for o in outputs) / len(outputs)
        cpu = cpu_shares(before, after, groups)
        m = Measurement(name, len(latencies), window, latencies, errors, sample, cpu)
        if cache and lookups_before is not None:
            after_lookups = await cache_lookups(port, cache)
            m.cache = {k: after_lookups.get(k, 0) - lookups_before.get(k, 0) for k in after_lookups}
        return m

    async def raw_load(self, name: str, op: Callable[[int], Awaitable[None]]) -> Measurement:
        """Run ``op`` from this process at the same concurrency, closed loop."""
        assert self.services is not None
        latencies: list[float] = []
        errors: dict[str, int] = {}
        sample: list[str] = []
        state = {"recording": False, "stopping": False}

        async def worker(i: int) -> None:
            perf = time.perf_counter
            while not state["stopping"]:
                started = perf()
                try:
                    await op(i)
                except Exception as exc:
                    if state["recording"]:
                        errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                        if not sample:
                            sample.append(repr(exc)[:400])
                    continue
                if state["recording"]:
                    latencies.append((perf() - started) * 1000.0)

        pids = self.pids()
        groups = {key: key for key in pids}
        workers = [asyncio.create_task(worker(i)) for i in range(self.opts.connections)]
        try:
            await asyncio.sleep(self.opts.warmup)
            before = self.services.snapshot(pids)
            state["recording"] = True
            t0 = time.perf_counter()
            await asyncio.sleep(self.opts.seconds)
            # As in bench.load: a window closes only once something was answered (bounded).
            deadline = time.perf_counter() + 30
            while not (latencies or errors) and time.perf_counter() < deadline:
                await asyncio.sleep(0.005)
            state["recording"] = False
            window = time.perf_counter() - t0
            after = self.services.snapshot(pids)
        finally:
            state["stopping"] = True
            await asyncio.wait(workers, timeout=30)
        latencies.sort()
        cpu = cpu_shares(before, after, groups)
        return Measurement(
            name, len(latencies), window, latencies, errors, sample[0] if sample else None, cpu
        )

    # ---- the whole run ---------------------------------------------------------------------

    def endpoints(
        self, raw: RawStore, token: str, task_ids: list[str], port: int | None = None
    ) -> list[Endpoint]:
        """The four measured operations."""
        port = port or self.web_port
        rng = random.Random(3)
        future = (datetime.now(UTC) + timedelta(days=3)).isoformat()
        posts = [
            json.dumps(
                {
                    "title": f"Benchmark task {i}",
                    "priority": rng.choice(["low", "medium", "high"]),
                    "tags": ["bench"],
                    **({"due_at": future} if i % 2 else {}),
                },
                separators=(",", ":"),
            )
            for i in range(16)
        ]
        return [
            Endpoint(
                "list",
                "GET /tasks",
                [http_request(port, "GET", f"{API}/tasks", token)],
                (200,),
                raw.full(raw.first_page_q),
                raw.first_page_q,
                "MGET generation + cached first page (a hit)",
                cache="first_page",
            ),
            Endpoint(
                "list_todo",
                "GET /tasks?status=todo",
                [http_request(port, "GET", f"{API}/tasks?status=todo", token)],
                (200,),
                raw.full(raw.list_q),
                raw.list_q,
                "find 51 by owner + status, sorted (created_at, _id) desc, hinted",
            ),
            Endpoint(
                "get",
                "GET /tasks/{id}",
                [http_request(port, "GET", f"{API}/tasks/{t}", token) for t in task_ids],
                (200,),
                raw.full(raw.get_q),
                raw.get_q,
                "find_one by _id (owner compared in Python)",
            ),
            Endpoint(
                "stats",
                "GET /tasks/stats",
                [http_request(port, "GET", f"{API}/tasks/stats", token)],
                (200,),
                raw.full(raw.stats_q),
                raw.stats_q,
                "MGET generation + cached stats (a hit)",
                expect_header="X-Cache: hit",
                cache="stats",
            ),
            Endpoint(
                "create",
                "POST /tasks",
                [http_request(port, "POST", f"{API}/tasks", token, body) for body in posts],
                (201,),
                raw.full(raw.create_q),
                raw.create_q,
                "transaction: insert task + insert event; INCR generation",
            ),
        ]

    async def run(self) -> str:
        """Everything; returns the report."""
        started = time.monotonic()
        try:
            await self.start()
            self.rss("idle after start")
            token, user_id, task_ids = await self.seed()
            self.rss("after seeding")
            assert self.settings is not None
            raw = RawStore(self.settings, token, user_id, task_ids)
            await raw.setup()
            try:
                measured = await self.measure_all(raw, token, task_ids)
            finally:
                await raw.close()
            assert self.web is not None
            rss, hwm = rss_mb(self.web.pid)
            self.results["web_rss_mb"] = round(rss, 1)
            self.results["web_peak_rss_mb"] = round(hwm, 1)
            self.results["ratios"] = {k: self.ratio(measured, k)[0] for k in ENDPOINT_KEYS}
            if self.opts.share_rounds > 0:
                self.results["share"] = await self.ceiling_share(raw, token, task_ids)
            if self.opts.scaling_cores > 0:
                self.results["scaling"] = await scaling.measure(
                    self, raw, token, task_ids, self.opts.scaling_cores, self.opts.scaling_rounds
                )
            trials: dict[str, dict[str, list[Measurement]]] = {}
            if self.opts.trials:
                trials = await self.run_trials(raw, token, task_ids)
            profiles = []
            if self.opts.profile:
                for key in self.profile_choice(measured):
                    profiles.append(await self.profile(key, measured, token, task_ids, raw))
        finally:
            self.stop()
        self.results["total_seconds"] = round(time.monotonic() - started, 1)
        return self.report(measured, profiles, trials)

    async def measure_all(
        self, raw: RawStore, token: str, task_ids: list[str]
    ) -> dict[str, dict[str, Measurement]]:
        """Ceiling, then per endpoint: raw (whole request), raw (queries only), HTTP."""
        out: dict[str, dict[str, Measurement]] = {}
        self.note("measuring the bare-aiohttp ceiling")
        out["ceiling"] = {
            "http": await self.http_load("ceiling", self.ceiling_port, [self.ceiling_request])
        }
        for endpoint in self.endpoints(raw, token, task_ids):
            await self.check(endpoint, token)
            self.note(f"measuring {endpoint.label}: raw store, then HTTP")
            out[endpoint.key] = {
                "raw": await self.raw_load(f"raw {endpoint.label}", endpoint.raw),
                "raw_queries": await self.raw_load(
                    f"raw {endpoint.label} (queries only)", endpoint.raw_queries
                ),
                "http": await self.http_load(
                    endpoint.label,
                    self.web_port,
                    endpoint.requests,
                    ok=endpoint.ok,
                    expect_header=endpoint.expect_header,
                    cache=endpoint.cache,
                ),
            }
            self.rss(f"after {endpoint.label}")
            self.results.setdefault("raw_desc", {})[endpoint.key] = endpoint.raw_desc
        return out

    @property
    def ceiling_request(self) -> str:
        """The one request the bare-aiohttp ceiling answers."""
        return f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{self.ceiling_port}\r\n\r\n"

    async def ceiling_share(self, raw: RawStore, token: str, task_ids: list[str]) -> dict[str, Any]:
        """The cached reads against the ceiling with their windows in turns: each round
        measures the ceiling, cached stats and the cached first page (the order reversed every
        other round, ABBA), ``trial_seconds`` each; a read's share is the median over rounds of
        its req/s over that round's ceiling. The table above measures the ceiling once, minutes
        before the endpoints, and on a shared machine the two windows get unequal CPU.

        It runs after ``POST /tasks``, whose writes left the web process's relay a backlog of
        events and the user's cache entries stale: first the process is let go quiet (its CPU
        under a tenth of a core, for 60 s at most) and both entries are read back in."""
        web = self.web
        assert web is not None
        await until_quiet(lambda: tree_cpu(web.pid))
        windows: list[tuple[str, int, list[str], tuple[int, ...], str | None]] = [
            ("ceiling", self.ceiling_port, [self.ceiling_request], (200,), None)
        ]
        for e in self.endpoints(raw, token, task_ids):
            if e.key in SHARE_KEYS:
                await self.check(e, token)
                windows.append((e.key, self.web_port, e.requests, e.ok, e.expect_header))
        rps: dict[str, list[float]] = {w[0]: [] for w in windows}
        for r in range(self.opts.share_rounds):
            for key, port, requests, ok, header in windows if r % 2 == 0 else windows[::-1]:
                self.note(f"in turns with the ceiling, round {r + 1}: {key}")
                m = await self.http_load(
                    f"{key} [in turns]",
                    port,
                    requests,
                    ok=ok,
                    expect_header=header,
                    seconds=self.opts.trial_seconds,
                )
                rps[key].append(m.rps)
        shares = {
            key: statistics.median(
                v / c if c else 0.0 for v, c in zip(rps[key], rps["ceiling"], strict=True)
            )
            for key in SHARE_KEYS
        }
        return {
            "rounds": self.opts.share_rounds,
            "seconds": self.opts.trial_seconds,
            "rps": rps,
            "shares": shares,
            "target": SHARE_TARGET,
            "pass": all(s >= SHARE_TARGET for s in shares.values()),
        }

    # ---- profile ---------------------------------------------------------------------------

    def profile_choice(self, measured: dict[str, dict[str, Measurement]]) -> list[str]:
        """The endpoints to profile: as asked, or (auto) the one furthest below its target
        among those whose web process was the busiest process (its own CPU limits it)."""
        asked = self.opts.profile or "auto"
        if asked != "auto":
            return asked.split(",")

        def bound_by_web(key: str) -> bool:
            cpu = measured[key]["http"].cpu
            ours = {g: v for g, v in cpu.items() if g != "other"}
            return max(ours, key=lambda g: ours[g]) == "web"

        candidates = [k for k in ENDPOINT_KEYS if bound_by_web(k)] or list(ENDPOINT_KEYS)
        return [min(candidates, key=lambda k: self.results["ratios"][k])]

    async def profile(
        self,
        key: str,
        measured: dict[str, dict[str, Measurement]],
        token: str,
        task_ids: list[str],
        raw: RawStore,
    ) -> dict[str, Any]:
        """Profile one endpoint in a fresh web process under cProfile (the measured process
        is stopped first, so the two never share the CPU)."""
        assert self.services is not None
        assert self.web is not None
        self.web.stop()
        port = free_port()
        fd, prof_path = tempfile.mkstemp(prefix="bench-web-", suffix=".prof")
        os.close(fd)
        os.unlink(prof_path)
        self.web = self.services.spawn(
            f"web-profiled-{key}",
            [python(), "-m", "bench.webproc", "--profile", prof_path, "--port", str(port)],
            self.web_env(self.services),
        )
        pid = self.web.pid
        try:
            await wait_http(self.web, f"http://127.0.0.1:{port}/readyz", timeout=60)
            endpoint = next(e for e in self.endpoints(raw, token, task_ids, port) if e.key == key)
            await self.check(endpoint, token, port)
            self.note(f"profiling {endpoint.label} under cProfile")
            m = await self.http_load(
                f"{endpoint.label} (profiled)",
                port,
                endpoint.requests,
                ok=endpoint.ok,
                expect_header=endpoint.expect_header,
                on_mark=lambda: os.kill(pid, signal.SIGUSR1),
                on_stop=lambda: os.kill(pid, signal.SIGUSR2),
            )
            deadline = time.monotonic() + 30
            while not os.path.exists(prof_path) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)  # let the dump finish writing
            analysis = analyze_profile(prof_path, m.ok + m.error_count)
        finally:
            if os.path.exists(prof_path):
                os.unlink(prof_path)
        analysis["endpoint"] = endpoint.label
        analysis["profiled"] = m.summary()
        analysis["unprofiled_rps"] = round(measured[key]["http"].rps, 1)
        analysis["unprofiled_web_ms"] = round(web_ms_per_request(measured[key]["http"]), 3)
        return analysis

    async def start_trial(self, patches: str) -> tuple[Child, int]:
        """A fresh web process with trial ``patches`` ("none": without), after three sign-ins
        (argon2 runs on threads, as during the seeding of the measured process)."""
        assert self.services is not None
        port = free_port()
        names = [] if patches == "none" else list(PATCH_NAMES if patches == "all" else [patches])
        args = [python(), "-m", "bench.webproc", "--port", str(port)]
        code = [n for n in names if n not in ENV_PATCHES]
        if code:
            args += ["--patches", ",".join(code)]
        env = self.web_env(self.services)
        for name in names:
            env.update(ENV_PATCHES.get(name, {}))
        child = self.services.spawn(f"web-{patches}", args, env)
        await wait_http(child, f"http://127.0.0.1:{port}/readyz", timeout=60)
        rss_idle = rss_mb(child.pid)[0]
        async with aiohttp.ClientSession() as http:
            for _ in range(3):
                async with http.post(
                    f"http://127.0.0.1:{port}{API}/auth/login",
                    json={"email": self.login_email, "password": PASSWORD},
                ) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"login answered {resp.status}: {await resp.text()}")
        self.trial_rss[patches] = (rss_idle, math.nan)
        return child, port

    async def run_trials(
        self, raw: RawStore, token: str, task_ids: list[str]
    ) -> dict[str, dict[str, list[Measurement]]]:
        """Measure the trial endpoints on every trial process, round-robin for several rounds
        (alternating the order), so that a slow spell of the machine hits all of them."""
        assert self.web is not None
        self.web.stop()
        variants = ["none", *self.opts.trials]
        keys = [k for k in ENDPOINT_KEYS if k in self.opts.trial_endpoints]
        procs = {v: await self.start_trial(v) for v in variants}
        samples = await self.alternate(
            raw, token, task_ids, procs, keys, self.opts.trial_rounds, "trial"
        )
        for v, (child, _) in procs.items():
            self.trial_rss[v] = (self.trial_rss[v][0], rss_mb(child.pid)[0])
            child.stop()
        return samples

    async def alternate(
        self,
        raw: RawStore,
        token: str,
        task_ids: list[str],
        procs: dict[str, tuple[Child, int]],
        keys: list[str],
        rounds: int,
        tag: str,
    ) -> dict[str, dict[str, list[Measurement]]]:
        """Measure the ``keys`` endpoints on each variant's process (``procs``: variant ->
        process and port), the variants in turns over ``rounds`` with the order alternating
        (ABBA), so that a slow spell of the machine hits all of them; ``trial_seconds``
        windows, each with the cores its process tree used (``tree_cores``)."""
        samples: dict[str, dict[str, list[Measurement]]] = {v: {k: [] for k in keys} for v in procs}
        variants = list(procs)
        main = self.web
        try:
            for r in range(rounds):
                for v in variants if r % 2 == 0 else variants[::-1]:
                    child, port = procs[v]
                    self.web = child  # the CPU table's "web" column
                    for endpoint in self.endpoints(raw, token, task_ids, port):
                        if endpoint.key not in keys:
                            continue
                        await self.check(endpoint, token, port)
                        self.note(f"{tag} round {r + 1}: {v}: {endpoint.label}")
                        cpu0, t0 = tree_cpu(child.pid), time.monotonic()
                        m = await self.http_load(
                            f"{endpoint.label} [{v}]",
                            port,
                            endpoint.requests,
                            ok=endpoint.ok,
                            expect_header=endpoint.expect_header,
                            seconds=self.opts.trial_seconds,
                        )
                        m.tree_cores = (tree_cpu(child.pid) - cpu0) / (time.monotonic() - t0)
                        samples[v][endpoint.key].append(m)
        finally:
            self.web = main
        return samples

    # ---- report ----------------------------------------------------------------------------

    @staticmethod
    def ratio(
        measured: dict[str, dict[str, Measurement]], key: str
    ) -> tuple[float, float, str, float]:
        """``(ratio, basis req/s, basis name, needed ratio)`` of one endpoint's target."""
        ceiling = measured["ceiling"]["http"].rps
        http, rawm = measured[key]["http"], measured[key]["raw"]
        if key == "stats":
            basis, name, need = ceiling, "ceiling", 0.50
        else:
            basis, name = min((ceiling, "ceiling"), (rawm.rps, "raw store"), key=lambda t: t[0])
            need = 0.70
        return (http.rps / basis if basis else 0.0), basis, name, need

    def report(
        self,
        measured: dict[str, dict[str, Measurement]],
        profiles: list[dict[str, Any]],
        trials: dict[str, dict[str, list[Measurement]]],
    ) -> str:
        """The text report (also kept as JSON in ``self.results``)."""
        assert self.opts is not None
        ceiling = measured["ceiling"]["http"]
        rows: list[dict[str, Any]] = []
        for key in ENDPOINT_KEYS:
            http, rawm = measured[key]["http"], measured[key]["raw"]
            ratio, basis, basis_name, need = self.ratio(measured, key)
            checks = [ratio >= need and http.error_count == 0]
            if key == "stats":
                checks.append(http.pct(95) <= 10.0)
            rows.append(
                {
                    "key": key,
                    "label": ENDPOINT_LABELS[key],
                    "http": http,
                    "raw": rawm,
                    "raw_queries": measured[key]["raw_queries"],
                    "basis": basis,
                    "basis_name": basis_name,
                    "need": need,
                    "ratio": ratio,
                    "pass": all(checks),
                    "p95_pass": (http.pct(95) <= 10.0) if key == "stats" else None,
                }
            )
        rss = self.results["web_rss_mb"]
        seed = self.results["seed"]
        services = self.services_desc
        lines: list[str] = []
        add = lines.append
        W = 23
        add("API benchmark: everything below was measured in this one run")
        add(f"  command   python -m bench api {' '.join(self.argv)}".rstrip())
        add(
            f"  when      {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}, "
            f"{self.results['total_seconds']:.0f} s in all"
        )
        add(
            f"  machine   {os.cpu_count()} cores ({cpu_model()}), {platform.system()}, "
            f"Python {platform.python_version()}"
        )
        add(
            f"  software  aiohttp {version('aiohttp')}, pymongo {version('pymongo')}, "
            f"redis-py {version('redis')}, pydantic {version('pydantic')}"
        )
        add(f"  store     {services}")
        add(
            f"  load      {self.opts.connections} keep-alive connections from "
            f"{self.opts.clients} load-generator process(es) (python -m bench.load), closed "
            f"loop, {self.opts.warmup:g} s warm-up + {self.opts.seconds:g} s window each"
        )
        add(
            f"  seed      {seed['tasks']} tasks for the measured user + {seed['other_users']} "
            f"other users with {seed['other_tasks_each']} each, over HTTP in {seed['seconds']} s"
        )
        add("")
        add(
            f"ceiling (bare aiohttp, one process): {ceiling.rps:,.0f} req/s, "
            f"p50 {ceiling.pct(50):.1f} / p95 {ceiling.pct(95):.1f} / "
            f"p99 {ceiling.pct(99):.1f} ms, errors {ceiling.error_count}"
        )
        add("")
        head = (
            f"{'endpoint':<{W}}{'req/s':>8}{'p50':>8}{'p95':>8}{'p99':>8}{'err':>6}  "
            f"{'ceiling':>8}{'raw':>8}  {'target':<34}{'ratio':>7}  result"
        )
        add(head)
        add("-" * len(head))
        for r in rows:
            h: Measurement = r["http"]
            target = f">= {r['need']:.0%} of {r['basis_name']} ({r['basis']:,.0f})"
            add(
                f"{r['label']:<{W}}{h.rps:>8,.0f}{h.pct(50):>8.1f}{h.pct(95):>8.1f}"
                f"{h.pct(99):>8.1f}{h.error_count:>6}  {ceiling.rps:>8,.0f}"
                f"{r['raw'].rps:>8,.0f}  {target:<34}{r['ratio']:>7.1%}  "
                f"{'PASS' if r['ratio'] >= r['need'] and h.error_count == 0 else 'MISS'}"
            )
            if r["p95_pass"] is not None:
                add(
                    f"{'':<{W}}{'':>8}{'':>8}{'':>8}{'':>8}{'':>6}  {'':>8}{'':>8}  "
                    f"{'p95 <= 10 ms':<34}{h.pct(95):>5.1f}ms  "
                    f"{'PASS' if r['p95_pass'] else 'MISS'}"
                )
        add("(latencies in ms; req/s counts only successful answers; raw = raw store ops/s)")
        add("")
        add(
            f"web process RSS after the run: {rss:.1f} MB "
            f"(peak {self.results['web_peak_rss_mb']:.1f} MB), target <= {RSS_LIMIT_MB:.0f} MB: "
            f"{'PASS' if rss <= RSS_LIMIT_MB else 'MISS'}"
        )
        add(
            "web process RSS along the run: "
            + ", ".join(f"{when} {mb:.1f}" for when, mb in self.rss_trail)
            + " MB"
        )
        for r in rows:
            h = r["http"]
            if h.hit_ratio is not None:
                add(
                    f"cache hits during {r['label']}: {h.hit_ratio:.1%} of "
                    f"{sum((h.cache or {}).values()):,.0f} lookups (from /metrics)"
                )
        for r in rows:
            h = r["http"]
            if h.error_count:
                add(f"errors in {r['label']}: {h.errors}; first: {h.error_sample}")
        add("")
        add(
            "raw store: this process, "
            f"{self.opts.connections} concurrent, the web process's own client factories"
        )
        add(
            f"{'endpoint':<{W}}{'request':>10}{'queries':>10}  what (request = denylist EXISTS"
            " + rate-limit EVALSHA + queries)"
        )
        for r in rows:
            add(
                f"{r['label']:<{W}}{r['raw'].rps:>10,.0f}{r['raw_queries'].rps:>10,.0f}  "
                f"{self.results['raw_desc'][r['key']]}"
            )
        add("")
        add(
            f"CPU during each window, cores busy (of {os.cpu_count()}); web ms = web CPU per answer"
        )
        groups = ["web", "ceiling", "mongo", "redis", "load", "bench", "other"]
        add(f"{'window':<34}" + "".join(f"{g:>8}" for g in groups) + f"{'web ms':>8}")
        order = [("ceiling", "http")] + [
            (k, kind) for k in ENDPOINT_KEYS for kind in ("raw", "raw_queries", "http")
        ]
        for key, kind in order:
            m = measured[key][kind]
            cells = "".join(f"{m.cpu.get(g, 0.0):>8.2f}" for g in groups)
            per = f"{web_ms_per_request(m):>8.2f}" if kind == "http" and key != "ceiling" else ""
            add(f"{m.name:<34}{cells}{per}")
        add("")
        for line in bottlenecks(measured):
            add(line)
        add(
            f"note: closed loop, so by Little's law mean latency = {self.opts.connections} / "
            "throughput: a p95 of 10 ms at saturation needs more than "
            f"{self.opts.connections / 0.010:,.0f} req/s."
        )
        lines += share_lines(self.results.get("share"))
        lines += scaling.lines(self.results.get("scaling", {}), ENDPOINT_LABELS)
        if trials:
            add("")
            lines += trial_lines(trials, self.trial_rss)
            self.results["trials"] = {
                name: {
                    "rss_mb": self.trial_rss.get(name),
                    **{
                        k: [m.summary() | {"web_ms": round(web_ms_per_request(m), 3)} for m in ml]
                        for k, ml in ms.items()
                    },
                }
                for name, ms in trials.items()
            }
        for profile in profiles:
            add("")
            lines += profile_lines(profile)
        self.results["endpoints"] = {
            r["key"]: {
                "label": r["label"],
                "http": r["http"].summary(),
                "raw": r["raw"].summary(),
                "raw_queries": r["raw_queries"].summary(),
                "target_basis": r["basis_name"],
                "target_basis_rps": round(r["basis"], 1),
                "ratio": round(r["ratio"], 4),
                "pass": r["pass"],
                "web_ms_per_request": round(web_ms_per_request(r["http"]), 3),
                "cache_hit_ratio": r["http"].hit_ratio,
            }
            for r in rows
        }
        self.results["ceiling"] = ceiling.summary()
        self.results["rss_pass"] = rss <= RSS_LIMIT_MB
        self.results["rss_trail_mb"] = [[w, round(mb, 1)] for w, mb in self.rss_trail]
        self.results["profiles"] = profiles
        return "\n".join(lines) + "\n"

    @property
    def services_desc(self) -> str:
        """The store servers, as the report names them."""
        return str(self.results.get("services", "?"))


ENDPOINT_KEYS = ("list", "list_todo", "get", "stats", "create")
ENDPOINT_LABELS = {
    "list": "GET /tasks",
    "list_todo": "GET /tasks?status=todo",
    "get": "GET /tasks/{id}",
    "stats": "GET /tasks/stats",
    "create": "POST /tasks",
}


async def cache_lookups(port: int, cache: str) -> dict[str, float]:
    """``cache_requests_total`` of one cache, by result, from the process's /metrics."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/metrics") as resp,
    ):
        text = await resp.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("cache_requests_total{") and f'cache="{cache}"' in line:
            labels, _, value = line.rpartition(" ")
            result = labels.split('result="', 1)[1].split('"', 1)[0]
            out[result] = out.get(result, 0.0) + float(value)
    return out


def share_lines(share: dict[str, Any] | None) -> list[str]:
    """The report's lines for :meth:`ApiBench.ceiling_share` (none when it did not run)."""
    if not share:
        return []
    rps = share["rps"]
    out = [
        "",
        f"cached reads in turns with the ceiling ({share['rounds']} rounds ABBA, "
        f"{share['seconds']:g} s windows; share = median over rounds of read / that round's "
        "ceiling):",
        f"  ceiling req/s by round: {', '.join(f'{v:,.0f}' for v in rps['ceiling'])}",
    ]
    for key, value in share["shares"].items():
        ok = value >= share["target"]
        out.append(
            f"  {ENDPOINT_LABELS[key]:<18} req/s by round: "
            f"{', '.join(f'{v:,.0f}' for v in rps[key])}; share {value:.1%}, "
            f"target >= {share['target']:.0%}: {'PASS' if ok else 'MISS'}"
        )
    return out


def trial_lines(
    trials: dict[str, dict[str, list[Measurement]]], rss: dict[str, tuple[float, float]]
) -> list[str]:
    """The trial-patch table: median req/s and web CPU per answer over the rounds, change
    against "none"; RSS."""
    keys = list(trials["none"])
    rounds = len(trials["none"][keys[0]])
    out = [
        "trial patches (bench/patches.py, not product code): one fresh web process per line"
        f" (3 sign-ins first), all measured round-robin, {rounds} round(s); median req/s and"
        " web CPU ms per answer, change against 'none'; RSS idle after start -> after the rounds",
        f"{'patches':<22}" + "".join(f"{ENDPOINT_LABELS[k]:>30}" for k in keys) + "   RSS MB",
    ]

    def medians(ms: list[Measurement]) -> tuple[float, float, int]:
        return (
            statistics.median(m.rps for m in ms),
            statistics.median(web_ms_per_request(m) for m in ms),
            sum(m.error_count for m in ms),
        )

    base = {k: medians(trials["none"][k]) for k in keys}
    for name, per_key in trials.items():
        cells = []
        for k in keys:
            rps, ms, errors = medians(per_key[k])
            cell = f"{rps:,.0f}/s {ms:.2f} ms"
            if name != "none" and base[k][1]:
                cell += f" ({ms / base[k][1] - 1:+.0%})"
            if errors:
                cell += f" ERR {errors}"
            cells.append(f"{cell:>30}")
        idle, end = rss.get(name, (math.nan, math.nan))
        out.append(f"{name:<22}" + "".join(cells) + f"   {idle:.0f} -> {end:.0f}")
    out.append(
        "(the change is of web CPU per answer, the steadier number on a shared machine; req/s"
        " follows the CPU the web process was given)"
    )
    return out


def web_ms_per_request(m: Measurement) -> float:
    """Web-process CPU milliseconds per answer during a window."""
    answers = m.ok + m.error_count
    return m.cpu.get("web", 0.0) * m.window * 1000 / answers if answers else math.inf


def bottlenecks(measured: dict[str, dict[str, Measurement]]) -> list[str]:
    """Which process saturated in each HTTP window, and whether others disturbed the run."""
    out = ["bottleneck (the busiest process; one Python process saturates at ~1.0 core):"]
    for key in ("ceiling", *ENDPOINT_KEYS):
        m = measured[key]["http"]
        server = "ceiling" if key == "ceiling" else "web"
        ranked = sorted(
            ((g, v) for g, v in m.cpu.items() if g != "other"), key=lambda t: t[1], reverse=True
        )
        top, cores = ranked[0]
        busy = sum(m.cpu.values())
        free = (os.cpu_count() or 1) - busy
        verdict = f"{top} at {cores:.2f} cores"
        if free > 0.3:
            verdict += f" ({free:.1f} cores idle: nothing saturated)"
        if top == "load":
            verdict += " - the load generator limits this number: add --clients"
        elif top != server and cores >= 0.85:
            verdict += f" - {server} waits on {top}"
        out.append(
            f"  {m.name:<18} {verdict}; load generator {m.cpu.get('load', 0):.2f}, "
            f"other processes {m.cpu.get('other', 0):.2f} cores"
        )
    noisy = [
        m.name
        for group in measured.values()
        for m in group.values()
        if m.cpu.get("other", 0) > 0.25
    ]
    if noisy:
        out.append(
            "  WARNING: other processes on this machine used > 0.25 core during: "
            + ", ".join(noisy)
            + " - those numbers are low"
        )
    return out


# --------------------------------------------------------------------------------------------
# Profile analysis

#: (label, substrings of the file path or of the built-in function's name), first match wins.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("idle (waiting in epoll)", ("select.epoll' objects>",)),
    ("socket syscalls (send/recv)", ("_socket.socket' objects>", "'send' of", "'recv")),
    ("pymongo + bson", ("/pymongo/", "/bson/", "_cbson", "bson.")),
    ("redis-py", ("/redis/",)),
    ("aiohttp + multidict + yarl", ("/aiohttp/", "/multidict/", "/yarl/", "_http_parser")),
    ("pydantic", ("/pydantic/", "/pydantic_core/", "pydantic_core")),
    ("PyJWT + hmac/hashlib", ("/jwt/", "hmac.py", "_hashlib", "hashlib")),
    ("json (stdlib)", ("/json/", "_json")),
    ("logging (structlog + stdlib)", ("/structlog/", "/logging/")),
    ("prometheus_client", ("/prometheus_client/",)),
    ("asyncio + selectors", ("/asyncio/", "selectors.py", "_asyncio", "contextvars")),
    ("our code (web/ core/ config/)", ("/web/", "/core/", "/config/")),
]


OTHER = "other (builtins, stdlib)"


def categorize(filename: str, funcname: str) -> str:
    """The category of one profiled function."""
    text = filename if filename != "~" else funcname
    for label, needles in CATEGORIES:
        if any(n in text for n in needles):
            return label
    return OTHER


#: Functions whose cumulative time per request is shown: (file suffix, function, label).
KEY_FUNCTIONS = [
    ("aiohttp/web_protocol.py", "_handle_request", "aiohttp: dispatch to our middlewares"),
    ("web/middlewares.py", "request_context", "middleware: request id, metrics, log"),
    ("web/middlewares.py", "problems", "middleware: problem+json"),
    ("web/routing.py", "handle", "route wrapper (auth, limit, validation, handler)"),
    ("web/routing.py", "_authenticate", "authentication (JWT + denylist)"),
    ("core/security.py", "decode", "JWT decode + verify"),
    ("core/accounts.py", "authenticate", "authenticate (decode + denylist EXISTS)"),
    ("web/ratelimit.py", "spend", "rate limit (EVALSHA)"),
    ("web/routing.py", "_parse_query", "query validation"),
    ("web/routing.py", "_parse_body", "body parse + validation"),
    ("web/routing.py", "json_response", "response: model_dump_json + Response"),
    ("core/tasks.py", "_query_page", "tasks list page (keyset_page)"),
    ("core/tasks.py", "public", "tasks.public (TaskPublic per doc)"),
    ("core/tasks.py", "get", "tasks.get"),
    ("core/tasks.py", "create", "tasks.create"),
    ("core/tasks.py", "stats", "tasks.stats"),
    ("core/cache.py", "cached", "cache.cached"),
    ("core/cache.py", "bump", "cache.bump (INCR)"),
    ("core/store.py", "transaction", "store.transaction"),
    ("structlog/_native.py", "meth", "structlog filtered call"),
]


def analyze_profile(path: str, requests: int) -> dict[str, Any]:
    """Group a cProfile dump's own time by category and pick out key functions."""
    stats = pstats.Stats(path)
    table: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in table.values())
    by_cat: dict[str, float] = {}
    for (filename, _, funcname), (_, _, tt, _, callers) in table.items():
        label = categorize(filename, funcname)
        if label == OTHER and filename == "~" and callers:
            # A generic builtin (any, isinstance, len, ...) counts for whoever called it,
            # in proportion to the time spent on behalf of each caller.
            spent = sum(c[2] for c in callers.values()) or 1.0
            for (cfile, _, cname), c in callers.items():
                share = tt * c[2] / spent
                clabel = categorize(cfile, cname)
                by_cat[clabel] = by_cat.get(clabel, 0.0) + share
            continue
        by_cat[label] = by_cat.get(label, 0.0) + tt
    per = max(1, requests)
    top = sorted(table.items(), key=lambda kv: kv[1][2], reverse=True)[:20]
    keys: list[dict[str, Any]] = []
    for suffix, func, label in KEY_FUNCTIONS:
        cum = sum(v[3] for (f, _, name), v in table.items() if f.endswith(suffix) and name == func)
        if cum:
            keys.append({"label": label, "ms_per_request": round(cum * 1000 / per, 4)})
    return {
        "requests": requests,
        "profiled_seconds": round(total, 3),
        "ms_per_request": round(total * 1000 / per, 4),
        "categories": [
            {"label": k, "ms_per_request": round(v * 1000 / per, 4), "share": round(v / total, 4)}
            for k, v in sorted(by_cat.items(), key=lambda kv: kv[1], reverse=True)
        ],
        "key_functions": keys,
        "top_functions": [
            {
                "function": f"{_short(f)}:{line}({name})",
                "calls": nc,
                "own_ms_per_request": round(tt * 1000 / per, 4),
                "cum_ms_per_request": round(ct * 1000 / per, 4),
            }
            for (f, line, name), (_, nc, tt, ct, _) in top
        ],
    }


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def profile_lines(p: dict[str, Any]) -> list[str]:
    """The profile section of the report."""
    prof = p["profiled"]
    out = [
        f"profile of {p['endpoint']}: cProfile on the event-loop thread's CPU clock, in a fresh"
        " web process. Profiling slows Python calls several-fold, so read the shares, not the"
        f" times: {prof['rps']:,.0f} req/s and {p['ms_per_request']:.2f} CPU ms per answer"
        f" profiled, vs {p['unprofiled_rps']:,.0f} req/s and {p['unprofiled_web_ms']:.2f} ms"
        " unprofiled. cProfile charges every Python call, so code made of many tiny calls"
        " (PyJWT checks a token character by character) looks bigger than it is:"
        " python -m bench steps times such steps unprofiled.",
        "own time by category (ms per request, share; a generic builtin such as any() or"
        " isinstance() counts for its callers):",
    ]
    for c in p["categories"]:
        out.append(f"  {c['label']:<34}{c['ms_per_request']:>8.3f}{c['share']:>8.1%}")
    out.append("cumulative time of key steps (ms per request):")
    for k in sorted(p["key_functions"], key=lambda k: k["ms_per_request"], reverse=True):
        out.append(f"  {k['label']:<52}{k['ms_per_request']:>8.3f}")
    out.append("top functions by own time (own / cumulative ms per request, calls):")
    for t in p["top_functions"][:12]:
        out.append(
            f"  {t['own_ms_per_request']:>7.3f} {t['cum_ms_per_request']:>7.3f} "
            f"{t['calls']:>8}  {t['function']}"
        )
    return out


# --------------------------------------------------------------------------------------------
# Entry point


def parse(argv: list[str]) -> Options:
    """Command-line options of ``python -m bench api``."""
    ap = argparse.ArgumentParser(prog="python -m bench api", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="measurement window per load")
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up before each window")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--clients", type=int, default=1, help="load-generator processes")
    ap.add_argument("--tasks", type=int, default=500, help="tasks seeded for the measured user")
    ap.add_argument(
        "--profile",
        nargs="?",
        const="auto",
        help="also profile endpoints (comma-separated keys: "
        + ",".join(ENDPOINT_KEYS)
        + "; auto, the default: the one furthest below its target among those limited by"
        " the web process's own CPU)",
    )
    ap.add_argument(
        "--trials",
        default="",
        help="also measure trial patches (comma-separated: "
        + ",".join(PATCH_NAMES)
        + ",all), each on a fresh web process beside an unpatched one",
    )
    ap.add_argument("--trial-rounds", type=int, default=3, help="round-robin rounds of trials")
    ap.add_argument("--trial-seconds", type=float, default=2.0, help="window per trial load")
    ap.add_argument(
        "--trial-endpoints",
        default="list,get,stats",
        help="endpoints the trials measure (comma-separated keys)",
    )
    ap.add_argument(
        "--scaling-cores",
        type=float,
        default=0.5,
        help="two web processes vs one, each held to this much of a core (cgroup quota; "
        "bench/scaling.py); 0 skips the comparison",
    )
    ap.add_argument("--scaling-rounds", type=int, default=2, help="ABBA rounds of the scaling")
    ap.add_argument(
        "--share-rounds",
        type=int,
        default=3,
        help="ABBA rounds of the cached reads in turns with the ceiling (0 skips them)",
    )
    ap.add_argument(
        "--out", type=Path, default=RESULTS / "api-latest.txt", help="report file ('-': none)"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    ns = ap.parse_args(argv)
    unknown_trials = {t for t in ns.trials.split(",") if t} - {*PATCH_NAMES, "all"}
    if unknown_trials:
        ap.error(f"--trials: unknown patch(es) {', '.join(sorted(unknown_trials))}")
    if ns.profile and ns.profile != "auto":
        unknown = set(ns.profile.split(",")) - set(ENDPOINT_KEYS)
        if unknown:
            ap.error(f"--profile: unknown endpoint(s) {', '.join(sorted(unknown))}")
    return Options(
        seconds=ns.seconds,
        warmup=ns.warmup,
        connections=ns.connections,
        clients=ns.clients,
        tasks=ns.tasks,
        profile=ns.profile,
        trials=[t for t in ns.trials.split(",") if t],
        trial_endpoints=[t for t in ns.trial_endpoints.split(",") if t],
        trial_rounds=max(1, ns.trial_rounds),
        trial_seconds=ns.trial_seconds,
        scaling_cores=max(0.0, ns.scaling_cores),
        scaling_rounds=max(1, ns.scaling_rounds),
        share_rounds=max(0, ns.share_rounds),
        out=None if str(ns.out) == "-" else ns.out,
        json_out=ns.json,
    )


def main(argv: list[str]) -> int:
    """Run the API benchmark; print the report and write it to the results file."""
    opts = parse(argv)
    bench = ApiBench(opts, argv)
    report = asyncio.run(bench.run())
    publish(report, opts.out)
    if opts.json_out is not None:
        write_json(opts.json_out, json.dumps(bench.results, indent=2, default=str))
    return 0
