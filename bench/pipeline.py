"""Worker pipeline as the store grows: the same burst of writes processed with 1,000 and then
20,000 tasks stored, and with one and two worker processes, measured in one run.

What runs (loopback only, bounded, stopped here): SecantusDB in memory, Redis (the machine's
under a unique key prefix, else a private one; every key deleted at the end), one
``taskmanager web`` (it runs the outbox relay) and ``taskmanager worker --processes 1
--threads 8`` (a second worker process joins for the last step). Other users' tasks are
written straight into MongoDB in the shape ``core.tasks.create`` stores them, with their
search entries and dispatched events (bench/growth.py's ``documents``), so the collections the
actors touch hold the stated number of documents.

Each step waits until the store is quiet (under a tenth of a core over a second: the seeding
leaves work behind), sends ``--writes`` ``POST /tasks`` for a fresh user (8 at a time) and
waits until every event they recorded is settled: sent by the relay and every side effect
finished (no awaited actor not yet finished: the event's receipts, core/events.py). Reported
per step: write → all settled seconds, worker throughput in actor messages per second over that
time (``task.created`` feeds four actors: cache, search, webhooks, analytics), MongoDB
operations per write (the server's opcounters over the step, all clients: web, relay, workers),
and the cores each process used.

Targets (issue: the fast path): throughput with 20,000 tasks stored ≥ 90 % of that with 1,000;
MongoDB operations per write ≤ 12; two worker processes ≥ 1.6 times one while the store has
headroom (the store's cores are printed beside it: on two cores it has none).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import aiohttp
from bson import ObjectId

from bench.api import API, PASSWORD, SECRET, task_body
from bench.growth import documents
from bench.procs import (
    Child,
    Services,
    event_settled,
    proc_cpu,
    product_env,
    product_settings,
    publish,
    taskmanager_exe,
    tree_cpu,
    wait_http,
)
from cli.embedded import free_port
from config.connections import Connections
from core import search
from core.context import open_context

RESULTS = Path(__file__).parent / "results"
#: Actor messages one ``task.created`` causes for a user without webhooks.
MESSAGES_PER_WRITE = 4
SETTLE_TIMEOUT = 300.0


class PipelineBench:
    """One run: start the store, a web process and a worker, then measure each step."""

    def __init__(self, sizes: tuple[int, ...], writes: int):
        self.sizes = sizes
        self.writes = writes
        self.port = free_port()
        self.results: dict[str, Any] = {"writes": writes, "steps": []}
        self.stored = 0

    def note(self, text: str) -> None:
        """Progress on stderr."""
        print(f"[bench pipeline] {text}", file=sys.stderr, flush=True)

    async def run(self) -> dict[str, Any]:
        """Everything, stopped at the end whatever happens."""
        started = time.monotonic()
        svc = Services.start()
        try:
            settings = product_settings(svc, SECRET)
            env = product_env(svc, SECRET)
            web = svc.spawn("web", [taskmanager_exe(), "web", "--port", str(self.port)], env)
            await wait_http(web, f"http://127.0.0.1:{self.port}/readyz", timeout=60)
            worker_args = [taskmanager_exe(), "worker", "--processes", "1", "--threads", "8"]
            workers = [svc.spawn("worker", worker_args, env)]
            self.results["services"] = (
                f"SecantusDB {version('SecantusDB')} in memory (embedded); Redis "
                f"{svc.redis_version()} ({svc.redis_source})"
            )
            async with (
                open_context(settings, Connections(settings)) as ctx,
                aiohttp.ClientSession() as http,
            ):
                await asyncio.sleep(3)  # the worker's start-up
                for size in self.sizes:
                    await self.grow(ctx, size)
                    self.results["steps"].append(
                        await self.step(ctx, http, svc, {"web": web, "worker": workers[0]})
                    )
                workers.append(svc.spawn("worker-2", worker_args, env))
                await asyncio.sleep(3)
                pids = {"web": web, "worker": workers[0], "worker-2": workers[1]}
                self.results["steps"].append(await self.step(ctx, http, svc, pids))
            self.results["seconds"] = round(time.monotonic() - started, 1)
        finally:
            svc.stop()
        return self.results

    async def grow(self, ctx: Any, size: int) -> None:
        """Store other users' tasks (with entries and dispatched events) up to ``size``."""
        missing = size - self.stored
        t0 = time.monotonic()
        for start in range(0, missing, 1000):
            n = min(1000, missing - start)
            tasks, events = documents(f"other{start}", n, random.Random(size + start))
            await ctx.store["tasks"].insert_many(tasks)
            await ctx.store["events"].insert_many(events)
            await ctx.store[search.COLLECTION].insert_many([search.entry(t) for t in tasks])
        self.stored = max(self.stored, size)
        self.note(f"{self.stored} tasks stored ({time.monotonic() - t0:.1f} s)")

    async def quiet(self, svc: Services, limit: float = 60.0) -> float:
        """Wait (at most ``limit`` s) until the store uses under a tenth of a core over a
        second, so that no step pays for the work its seeding left behind; returns the wait."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit:
            before = mongo_cpu(svc)
            await asyncio.sleep(1.0)
            if mongo_cpu(svc) - before < 0.1:
                break
        return round(time.monotonic() - t0, 1)

    async def step(
        self, ctx: Any, http: aiohttp.ClientSession, svc: Services, procs: dict[str, Child]
    ) -> dict[str, Any]:
        """One burst of writes for a fresh user, until every side effect is settled."""
        base = f"http://127.0.0.1:{self.port}{API}"
        body = {"email": f"p-{ObjectId()}@example.com", "password": PASSWORD, "name": "p"}
        async with http.post(f"{base}/auth/register", json=body) as resp:
            data = await resp.json()
            if resp.status != 201:
                raise RuntimeError(f"register answered {resp.status}: {data}")
        owner = str(data["user"]["id"])
        headers = {"Authorization": f"Bearer {data['access_token']}"}
        rng = random.Random(self.stored)
        now = time.time()
        bodies = [task_body(rng, _utc(now), i) for i in range(self.writes)]
        errors: list[int] = []
        gate = asyncio.Semaphore(8)

        async def post(b: dict[str, Any]) -> None:
            async with gate, http.post(f"{base}/tasks", json=b, headers=headers) as r:
                await r.read()
                if r.status != 201:
                    errors.append(r.status)

        quiet_wait = await self.quiet(svc)
        ops0 = await mongo_ops(ctx)
        cpu0 = {k: tree_cpu(p.pid) for k, p in procs.items()} | {"mongo": mongo_cpu(svc)}
        t0 = time.monotonic()
        await asyncio.gather(*(post(b) for b in bodies))
        acked = time.monotonic() - t0
        await self.settled(ctx, owner, t0 + SETTLE_TIMEOUT, procs)
        took = time.monotonic() - t0
        ops1 = await mongo_ops(ctx)
        cpu1 = {k: tree_cpu(p.pid) for k, p in procs.items()} | {"mongo": mongo_cpu(svc)}
        ops = {k: ops1.get(k, 0) - ops0.get(k, 0) for k in ops1}
        ok = self.writes - len(errors)
        result = {
            "stored": self.stored,
            "worker_processes": sum(1 for k in procs if k.startswith("worker")),
            "writes": ok,
            "errors": len(errors),
            "quiet_wait_seconds": quiet_wait,
            "acked_seconds": round(acked, 2),
            "settled_seconds": round(took, 2),
            "messages_per_second": round(ok * MESSAGES_PER_WRITE / took, 1),
            "ops_per_write": round(sum(ops.values()) / max(ok, 1), 1),
            "ops": {k: round(v / max(ok, 1), 1) for k, v in ops.items() if v},
            "cores": {k: round((cpu1[k] - cpu0[k]) / took, 2) for k in cpu1},
        }
        self.note(
            f"{self.stored} stored, {result['worker_processes']} worker(s): "
            f"{result['messages_per_second']} msgs/s, {result['ops_per_write']} ops/write"
        )
        return result

    async def settled(self, ctx: Any, owner: str, deadline: float, procs: dict[str, Child]) -> None:
        """Wait until every ``task.created`` event of ``owner`` is sent and each actor it fed
        has finished (the
        welcome email of the registration is not waited for: no SMTP server runs here)."""
        events = ctx.store["events"]
        while time.monotonic() < deadline:
            mine = {"user_id": owner, "type": "task.created"}
            docs = await events.find(
                mine, {"pending": 1, "dispatched_at": 1, "awaiting": 1, "finished": 1}
            ).to_list()
            if all(event_settled(d) for d in docs):
                return
            await asyncio.sleep(0.1)
        left = await events.find(mine, {"data": 0}).to_list(3)
        logs = "\n".join(f"--- {k}:\n{p.output()[-1500:]}" for k, p in procs.items())
        raise RuntimeError(f"{owner}'s events not settled in time, e.g. {left}\n{logs}")


def _utc(ts: float) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC)


async def mongo_ops(ctx: Any) -> dict[str, int]:
    """The server's operation counters."""
    status = await ctx.store.client.admin.command("serverStatus")
    return {k: int(v) for k, v in status.get("opcounters", {}).items()}


def mongo_cpu(svc: Services) -> float:
    """CPU seconds the store's process has used."""
    proc = svc.mongo.process
    return proc_cpu(proc.pid) if proc is not None else 0.0


def report(res: dict[str, Any]) -> str:
    """The text report: one row per step, then the targets."""
    steps = res["steps"]
    lines = [
        "Worker pipeline as the store grows (python -m bench pipeline): measured in one run",
        f"  services  {res.get('services', '?')}; {res.get('seconds', '?')} s in all",
        f"  each step: {res['writes']} POST /tasks (8 at a time) for a fresh user, until every "
        "event is settled (sent and every side effect finished)",
        "",
        f"{'stored':>7} {'workers':>7} {'acked s':>8} {'settled s':>9} {'msgs/s':>7} "
        f"{'ops/write':>9}  cores (web, worker(s), mongo)",
    ]
    for s in steps:
        cores = ", ".join(f"{k} {v:.2f}" for k, v in s["cores"].items())
        lines.append(
            f"{s['stored']:>7} {s['worker_processes']:>7} {s['acked_seconds']:>8.2f} "
            f"{s['settled_seconds']:>9.2f} {s['messages_per_second']:>7.1f} "
            f"{s['ops_per_write']:>9.1f}  {cores}"
        )
        lines.append(f"{'':>17}ops per write by kind: {s['ops']}; errors {s['errors']}")
    one = [s for s in steps if s["worker_processes"] == 1]
    lines.append("")
    if len(one) >= 2:
        ratio = one[-1]["messages_per_second"] / one[0]["messages_per_second"]
        verdict = "PASS" if ratio >= 0.9 else "MISS"
        lines.append(
            f"throughput with {one[-1]['stored']:,} stored vs {one[0]['stored']:,}: "
            f"{ratio:.0%} (target >= 90 %): {verdict}"
        )
    worst = max(s["ops_per_write"] for s in steps)
    lines.append(
        f"MongoDB operations per write, worst step: {worst:.1f} (target <= 12): "
        f"{'PASS' if worst <= 12 else 'MISS'}"
    )
    two = [s for s in steps if s["worker_processes"] == 2]
    if two and one:
        ratio = two[-1]["messages_per_second"] / one[-1]["messages_per_second"]
        mongo = two[-1]["cores"].get("mongo", 0.0)
        lines.append(
            f"two worker processes vs one at {two[-1]['stored']:,} stored: {ratio:.2f}x "
            f"(target >= 1.6x while the store has headroom; the store used {mongo:.2f} cores)"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """``python -m bench pipeline [--sizes 1000,20000] [--writes N]``."""
    ap = argparse.ArgumentParser(
        prog="python -m bench pipeline", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--sizes", default="1000,20000", help="tasks stored at each step")
    ap.add_argument("--writes", type=int, default=400, help="POST /tasks per step")
    ap.add_argument("--out", type=Path, default=RESULTS / "pipeline-latest.txt")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    ns = ap.parse_args(argv)
    sizes = tuple(int(s) for s in ns.sizes.split(",") if s)
    if not sizes or sorted(sizes) != list(sizes) or min(sizes) < 1 or ns.writes < 1:
        ap.error("--sizes: rising positive integers; --writes >= 1")
    res = asyncio.run(PipelineBench(sizes, ns.writes).run())
    publish(report(res), None if str(ns.out) == "-" else ns.out)
    if ns.json is not None:
        ns.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
