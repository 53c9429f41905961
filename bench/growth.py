"""Growth curves: latency of list, search, stats and activity as one user's tasks grow from
100 to 10,000, measured in one run against ONE ``taskmanager web`` process.

What runs (loopback only, bounded, stopped here): SecantusDB in memory and Redis (the
machine's under a unique key prefix, else a private one; every key deleted at the end), and
one web process. For each size a fresh user registers over HTTP; its tasks are then written
straight into MongoDB in the shape ``core.tasks.create`` stores (with one dispatched
``task.created`` event each, so activity reads a realistic ``events`` collection) together
with each task's search entry as ``core.search.entry`` builds it (what the ``index_task`` actor
writes; ``core.search.reindex``'s guarded upserts take ~60 ms a task on SecantusDB). Seeding
over HTTP would measure the write path, which bench/api.py and bench/workers.py already do.
Each request kind stops after ``--requests`` or ``--budget`` seconds, whichever is first.

Measured per size, over HTTP, one request at a time (latency, not throughput), after a
warm-up: ``GET /tasks`` (the first page: a cache hit), ``GET /tasks`` after a write (the
generation bumped before each request: the cache-miss path), ``GET /tasks?status=todo`` (a
MongoDB page), ``GET /search?q=…``, ``GET /tasks/stats`` (a hit), ``GET /tasks/stats`` after a
write (a miss: the aggregation), ``GET /tasks/{id}/activity``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

import aiohttp
from bson import ObjectId

from bench.api import API, PASSWORD, SECRET, WORDS, task_body
from bench.procs import (
    Services,
    product_env,
    product_settings,
    publish,
    rss_mb,
    taskmanager_exe,
    wait_http,
)
from cli.embedded import free_port
from config.connections import Connections
from core import search
from core.context import open_context
from core.task_models import TaskCreate
from core.tasks import NO_DUE, PRIORITY_RANK

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_SIZES = (100, 1000, 10_000)
#: (key, label) of each measured request kind, in report order.
KINDS = (
    ("list", "GET /tasks (cache hit)"),
    ("list_miss", "GET /tasks after a write"),
    ("list_todo", "GET /tasks?status=todo"),
    ("search", "GET /search?q=<word>"),
    ("stats", "GET /tasks/stats (cache hit)"),
    ("stats_miss", "GET /tasks/stats after a write"),
    ("activity", "GET /tasks/{id}/activity"),
)


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def documents(owner: str, count: int, rng: random.Random) -> tuple[list[dict[str, Any]], ...]:
    """``count`` tasks of ``owner`` as ``core.tasks.create`` stores them, and their events."""
    now = datetime.now(UTC)
    tasks, events = [], []
    for i in range(count):
        fields = TaskCreate.model_validate(task_body(rng, now, i)).model_dump()
        created = now - timedelta(minutes=count - i)
        doc = {
            "_id": ObjectId(),
            "owner": owner,
            **fields,
            "created_at": created,
            "updated_at": created,
            "version": 1,
            "completed_at": created if fields["status"] == "done" else None,
            "due_key": fields["due_at"] or NO_DUE,
            "priority_rank": PRIORITY_RANK[fields["priority"]],
        }
        tasks.append(doc)
        events.append(
            {
                "_id": ObjectId(),
                "type": "task.created",
                "user_id": owner,
                "actor_id": owner,
                "subject_id": str(doc["_id"]),
                "data": {"task": {"id": str(doc["_id"]), "title": doc["title"]}},
                "created_at": created,
                "request_id": None,
                "dispatched_at": created,
            }
        )
    return tasks, events


class GrowthBench:
    """One run: start the store and a web process, then seed and measure each size."""

    def __init__(self, sizes: tuple[int, ...], requests: int, warmup: int, budget: float):
        self.sizes = sizes
        self.budget = budget
        self.requests = requests
        self.warmup = warmup
        self.port = free_port()
        self.results: dict[str, Any] = {"sizes": {}, "requests": requests, "warmup": warmup}

    def note(self, text: str) -> None:
        """Progress on stderr."""
        print(f"[bench growth] {text}", file=sys.stderr, flush=True)

    async def run(self) -> dict[str, Any]:
        """Everything, stopped at the end whatever happens."""
        started = time.monotonic()
        svc = Services.start()
        try:
            settings = product_settings(svc, SECRET)
            env = product_env(svc, SECRET)
            web = svc.spawn("web", [taskmanager_exe(), "web", "--port", str(self.port)], env)
            await wait_http(web, f"http://127.0.0.1:{self.port}/readyz", timeout=60)
            self.results["services"] = (
                f"SecantusDB {version('SecantusDB')} in memory (embedded); Redis "
                f"{svc.redis_version()} ({svc.redis_source})"
            )
            async with (
                open_context(settings, Connections(settings)) as ctx,
                aiohttp.ClientSession() as http,
            ):
                for size in self.sizes:
                    self.results["sizes"][str(size)] = await self.one_size(ctx, http, svc, size)
            self.results["web_rss_mb"] = round(rss_mb(web.pid)[0], 1)
            self.results["seconds"] = round(time.monotonic() - started, 1)
        finally:
            svc.stop()
        return self.results

    async def one_size(
        self, ctx: Any, http: aiohttp.ClientSession, svc: Services, size: int
    ) -> dict[str, Any]:
        """Register a user, seed ``size`` tasks, measure every kind."""
        base = f"http://127.0.0.1:{self.port}{API}"
        body = {"email": f"g{size}-{ObjectId()}@example.com", "password": PASSWORD, "name": "g"}
        async with http.post(f"{base}/auth/register", json=body) as resp:
            data = await resp.json()
            if resp.status != 201:
                raise RuntimeError(f"register answered {resp.status}: {data}")
        token, owner = str(data["access_token"]), str(data["user"]["id"])
        headers = {"Authorization": f"Bearer {token}"}
        t0 = time.monotonic()
        tasks, events = documents(owner, size, random.Random(size))
        for start in range(0, size, 1000):
            await ctx.store["tasks"].insert_many(tasks[start : start + 1000])
            await ctx.store["events"].insert_many(events[start : start + 1000])
        seeded = time.monotonic() - t0
        t0 = time.monotonic()
        entries = [search.entry(t) for t in tasks]
        for start in range(0, size, 1000):
            await ctx.store[search.COLLECTION].insert_many(entries[start : start + 1000])
        reindex_s = time.monotonic() - t0
        self.note(f"{size} tasks seeded in {seeded:.1f} s, indexed in {reindex_s:.1f} s")
        ids = [str(t["_id"]) for t in tasks]
        rng = random.Random(7)
        gen_key = f"{svc.prefix}gen:{owner}"

        def path_of(kind: str) -> str:
            if kind in ("list", "list_miss"):
                return "/tasks"
            if kind == "list_todo":
                return "/tasks?status=todo"
            if kind == "search":
                return f"/search?q={rng.choice(WORDS)}"
            if kind in ("stats", "stats_miss"):
                return "/tasks/stats"
            return f"/tasks/{rng.choice(ids)}/activity"

        out: dict[str, Any] = {
            "seed_seconds": round(seeded, 2),
            "reindex_seconds": round(reindex_s, 2),
            "indexed": len(entries),
            "kinds": {},
        }
        for kind, _ in KINDS:
            times: list[float] = []
            errors = 0
            stop_at = time.monotonic() + self.budget
            for i in range(self.warmup + self.requests):
                if i > self.warmup + 3 and time.monotonic() > stop_at:
                    break
                if kind.endswith("_miss"):
                    svc.redis.incr(gen_key)  # what every acknowledged write does
                t = time.perf_counter()
                async with http.get(base + path_of(kind), headers=headers) as resp:
                    await resp.read()
                    ok = resp.status == 200
                elapsed = (time.perf_counter() - t) * 1000
                if i >= self.warmup:
                    times.append(elapsed)
                    errors += not ok
            out["kinds"][kind] = {
                "p50": round(statistics.median(times), 2),
                "p95": round(pct(times, 0.95), 2),
                "mean": round(statistics.fmean(times), 2),
                "errors": errors,
                "count": len(times),
            }
        return out


def report(res: dict[str, Any]) -> str:
    """The text report: one row per request kind, p50/p95 per size."""
    sizes = list(res["sizes"])
    lines = [
        "Growth curves (python -m bench growth): latency as one user's tasks grow, one run",
        f"  store     {res['services']}",
        f"  requests  {res['requests']} per kind and size, one at a time, after "
        f"{res['warmup']} warm-up (fewer when a kind's time budget ran out); "
        f"{res['seconds']} s in all",
        "  seed      "
        + ", ".join(
            f"{s}: {v['seed_seconds']} s + index {v['reindex_seconds']} s"
            for s, v in res["sizes"].items()
        ),
        "",
        f"{'p50 / p95 ms':<32}" + "".join(f"{int(s):>16,}" for s in sizes),
    ]
    for kind, label in KINDS:
        cells = []
        for s in sizes:
            k = res["sizes"][s]["kinds"][kind]
            cells.append(f"{k['p50']:.1f} / {k['p95']:.1f}".rjust(16))
        lines.append(f"{label:<32}" + "".join(cells))
    errors = sum(k["errors"] for v in res["sizes"].values() for k in v["kinds"].values())
    lines.append(f"errors: {errors}; web process RSS at the end {res['web_rss_mb']} MB")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """``python -m bench growth [--sizes 100,1000,10000] [--requests N]``."""
    ap = argparse.ArgumentParser(prog="python -m bench growth", description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default=",".join(str(s) for s in DEFAULT_SIZES))
    ap.add_argument("--requests", type=int, default=40, help="measured requests per kind")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up requests per kind")
    ap.add_argument("--budget", type=float, default=15.0, help="seconds per kind and size at most")
    ap.add_argument("--out", type=Path, default=RESULTS / "growth-latest.txt")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    ns = ap.parse_args(argv)
    sizes = tuple(int(s) for s in ns.sizes.split(",") if s)
    if not sizes or min(sizes) < 1 or ns.requests < 1:
        ap.error("--sizes of positive integers, --requests >= 1")
    res = asyncio.run(GrowthBench(sizes, ns.requests, ns.warmup, ns.budget).run())
    text = report(res)
    publish(text, None if str(ns.out) == "-" else ns.out)
    if ns.json is not None:
        ns.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
