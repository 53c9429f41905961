"""Worker pipeline as the store grows: the same burst of writes processed with 1,000 and with
20,000 tasks stored, and with one and two worker processes, measured in one run.

What runs (loopback only, bounded, stopped here): SecantusDB in memory, Redis (the machine's
under a unique key prefix, else a private one; every key deleted at the end) and, for each
size, a *stack* on a database of its own in that one store: one ``taskmanager web`` (it runs
the outbox relay) and ``taskmanager worker --processes 1 --threads 8``. Other users' tasks
are written straight into each stack's database in the shape ``core.tasks.create`` stores
them, with their search entries and dispatched events (bench/growth.py's ``documents``), so
the collections the actors touch hold the stated number of documents.

Each step waits until the store is quiet (under a tenth of a core over a second: the seeding
leaves work behind), sends ``--writes`` ``POST /tasks`` for a fresh user (8 at a time) to one
stack and waits until every event they recorded is settled: sent by the relay and every side
effect finished (no awaited actor not yet finished: the event's receipts, core/events.py).
The sizes take turns over ``--rounds`` rounds (ABBA: 1k, 20k, 20k, 1k), so a slow spell of
the machine hits both; each size's figure is the median of its steps. Reported per step:
write → all settled seconds, worker throughput in actor messages per second over that time
(``task.created`` feeds four actors: cache, search, webhooks, analytics), MongoDB operations
per write (the server's opcounters over the step, all clients: web, relay, workers, less this
benchmark's own polling, counted by command monitoring) and the cores each process used.

Worker scaling (``--worker-cores``, default 0.06; 0 skips it): on this machine every
uncapped step is bound by the test server (one Python process: its core is the pipeline's
ceiling), so a second worker process has nothing to add. To compare one worker process with
two *while the store has headroom*, as the target asks, each worker (the Dramatiq supervisor
and its worker process) is held to ``--worker-cores`` of a core by a cgroup CPU quota
(``bench.procs.CpuCap``; needs root), so the workers bind the pipeline and the store's cores
are printed beside it. One and two capped workers take turns on the largest stack (ABBA). The
scaling steps' user is given a fair-share weight of :data:`SCALING_WEIGHT` first (stored, as
``taskmanager share-weights set`` does), so that its window of events in flight does not bind
instead of the workers: a single user's 400-write burst is what the window exists to hold
back, and with the default window one capped worker did 21.4 and two 33.6 messages/s
(2026-12-02, window 16; 35.1 and 45.7 with 32).

Targets (issue: the fast path): throughput with 20,000 tasks stored ≥ 90 % of that with 1,000;
MongoDB operations per write ≤ 12; two worker processes ≥ 1.6 times one while the store has
headroom.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import aiohttp
from bson import ObjectId
from pymongo import monitoring

from bench.api import API, PASSWORD, SECRET, task_body
from bench.growth import documents
from bench.procs import (
    Child,
    CpuCap,
    Services,
    await_children,
    event_settled,
    proc_cpu,
    product_env,
    product_settings,
    publish,
    taskmanager_exe,
    tree_cpu,
    until_quiet,
    wait_http,
)
from cli.embedded import free_port
from config.connections import Connections
from core import fairness, search
from core.context import open_context

RESULTS = Path(__file__).parent / "results"


def worker_args() -> list[str]:
    """A worker as each stack runs it."""
    return [taskmanager_exe(), "worker", "--processes", "1", "--threads", "8"]


#: Actor messages one ``task.created`` causes for a user without webhooks.
MESSAGES_PER_WRITE = 4
SETTLE_TIMEOUT = 300.0
#: The scaling steps' user's fair-share weight (its window: that many times FAIR_SHARE_WINDOW).
SCALING_WEIGHT = 100
#: The store "has headroom" while it uses less than this many cores (one Python process).
STORE_BUSY = 0.7


class OwnCommands(monitoring.CommandListener):
    """Counts the MongoDB commands this process sends (its polling), so that a step's
    operations per write are the product's: the server's opcounters less these."""

    def __init__(self) -> None:
        self.sent = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.sent += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@dataclass
class Stack:
    """One size's web process and workers, on a database of its own in the shared store."""

    size: int
    db: str
    port: int
    env: dict[str, str]
    web: Child
    workers: list[Child]
    ctx: Any = None
    stored: int = 0


class PipelineBench:
    """One run: the store, a stack per size, the steps in turns, then the worker scaling."""

    def __init__(
        self, sizes: tuple[int, ...], writes: int, rounds: int = 2, worker_cores: float = 0.06
    ):
        self.sizes = sizes
        self.writes = writes
        self.rounds = rounds
        self.worker_cores = worker_cores
        self.results: dict[str, Any] = {"writes": writes, "rounds": rounds, "steps": []}
        self.own = OwnCommands()
        monitoring.register(self.own)  # before this process makes any client

    def note(self, text: str) -> None:
        """Progress on stderr."""
        print(f"[bench pipeline] {text}", file=sys.stderr, flush=True)

    async def run(self) -> dict[str, Any]:
        """Everything, stopped at the end whatever happens."""
        started = time.monotonic()
        svc = Services.start()
        try:
            async with contextlib.AsyncExitStack() as stack:
                stacks = [await self.start_stack(svc, size, stack) for size in self.sizes]
                self.results["services"] = (
                    f"SecantusDB {version('SecantusDB')} in memory (embedded); Redis "
                    f"{svc.redis_version()} ({svc.redis_source})"
                )
                await asyncio.sleep(3)  # the workers' start-up
                for st in stacks:
                    await self.grow(st)
                async with aiohttp.ClientSession() as http:
                    for r in range(self.rounds):
                        for st in stacks if r % 2 == 0 else stacks[::-1]:
                            step = await self.step(http, svc, st)
                            self.results["steps"].append({**step, "round": r + 1})
                    self.results["worker_scaling"] = await self.scaling(http, svc, stacks[-1])
            self.results["seconds"] = round(time.monotonic() - started, 1)
        finally:
            svc.stop()
        return self.results

    async def start_stack(
        self, svc: Services, size: int, exits: contextlib.AsyncExitStack
    ) -> Stack:
        """A web process and one worker on the database of ``size``."""
        db = f"{svc.db}_{size}"
        # Its own queues too: a worker must not take another stack's messages.
        env = product_env(svc, SECRET, MONGODB_DB=db, REDIS_PREFIX=f"{svc.prefix}{size}:")
        port = free_port()
        web = svc.spawn(f"web-{size}", [taskmanager_exe(), "web", "--port", str(port)], env)
        await wait_http(web, f"http://127.0.0.1:{port}/readyz", timeout=60)
        st = Stack(size, db, port, env, web, [svc.spawn(f"worker-{size}", worker_args(), env)])
        settings = product_settings(svc, SECRET).model_copy(
            update={"mongodb_db": db, "redis_prefix": env["REDIS_PREFIX"]}
        )
        st.ctx = await exits.enter_async_context(open_context(settings, Connections(settings)))
        return st

    async def grow(self, st: Stack) -> None:
        """Store other users' tasks (with entries and dispatched events) up to its size."""
        t0 = time.monotonic()
        for start in range(st.stored, st.size, 1000):
            n = min(1000, st.size - start)
            tasks, events = documents(f"other{start}", n, random.Random(st.size + start))
            await st.ctx.store["tasks"].insert_many(tasks)
            await st.ctx.store["events"].insert_many(events)
            await st.ctx.store[search.COLLECTION].insert_many([search.entry(t) for t in tasks])
        st.stored = st.size
        self.note(f"{st.stored} tasks stored ({time.monotonic() - t0:.1f} s)")

    async def scaling(
        self, http: aiohttp.ClientSession, svc: Services, st: Stack
    ) -> dict[str, Any]:
        """One capped worker against two, in turns, on ``st`` (see the module docstring)."""
        if self.worker_cores <= 0:
            return {}
        why = CpuCap.unavailable()
        if why is not None:
            return {"skipped": why}
        for worker in st.workers:
            worker.stop()
        st.workers = []
        steps: list[dict[str, Any]] = []
        for r in range(self.rounds):
            for count in (1, 2) if r % 2 == 0 else (2, 1):
                cap = CpuCap(uuid.uuid4().hex[:8])
                try:
                    for k in range(count):
                        worker = svc.spawn(f"capped-{k + 1}", worker_args(), st.env)
                        st.workers.append(worker)
                        members = await await_children(worker.pid, 1)
                        cap.cap(f"w{k + 1}", [worker.pid, *members], self.worker_cores)
                    await asyncio.sleep(3)  # the workers' start-up
                    step = await self.step(http, svc, st, weight=SCALING_WEIGHT)
                    steps.append({**step, "round": r + 1, "capped": True})
                finally:
                    for worker in st.workers:
                        worker.stop()
                    st.workers = []
                    cap.close()
        return {"cores_each": self.worker_cores, "weight": SCALING_WEIGHT, "steps": steps}

    async def quiet(self, svc: Services, limit: float = 60.0) -> float:
        """Wait (at most ``limit`` s) until the store uses under a tenth of a core over a
        second, so that no step pays for the work its seeding left behind; returns the wait."""
        return await until_quiet(lambda: mongo_cpu(svc), limit)

    async def step(
        self, http: aiohttp.ClientSession, svc: Services, st: Stack, weight: int | None = None
    ) -> dict[str, Any]:
        """One burst of writes for a fresh user (given the fair-share ``weight`` first, when
        given), until every side effect is settled."""
        base = f"http://127.0.0.1:{st.port}{API}"
        body = {"email": f"p-{ObjectId()}@example.com", "password": PASSWORD, "name": "p"}
        async with http.post(f"{base}/auth/register", json=body) as resp:
            data = await resp.json()
            if resp.status != 201:
                raise RuntimeError(f"register answered {resp.status}: {data}")
        owner = str(data["user"]["id"])
        if weight is not None:
            await fairness.set_weight(st.ctx, owner, weight, by="bench pipeline")
            await asyncio.sleep(fairness.WEIGHTS_TTL + 0.5)  # every relay has read it
        headers = {"Authorization": f"Bearer {data['access_token']}"}
        rng = random.Random(st.stored)
        now = time.time()
        bodies = [task_body(rng, _utc(now), i) for i in range(self.writes)]
        errors: list[int] = []
        gate = asyncio.Semaphore(8)

        async def post(b: dict[str, Any]) -> None:
            async with gate, http.post(f"{base}/tasks", json=b, headers=headers) as r:
                await r.read()
                if r.status != 201:
                    errors.append(r.status)

        procs = {"web": st.web} | {
            ("worker" if k == 0 else f"worker-{k + 1}"): w for k, w in enumerate(st.workers)
        }
        quiet_wait = await self.quiet(svc)
        ops0, own0 = await mongo_ops(st.ctx), self.own.sent
        cpu0 = {k: tree_cpu(p.pid) for k, p in procs.items()} | {"mongo": mongo_cpu(svc)}
        t0 = time.monotonic()
        await asyncio.gather(*(post(b) for b in bodies))
        acked = time.monotonic() - t0
        await self.settled(st.ctx, owner, t0 + SETTLE_TIMEOUT, procs)
        took = time.monotonic() - t0
        cpu1 = {k: tree_cpu(p.pid) for k, p in procs.items()} | {"mongo": mongo_cpu(svc)}
        own = self.own.sent - own0
        ops1 = await mongo_ops(st.ctx)
        ops = {k: ops1.get(k, 0) - ops0.get(k, 0) for k in ops1}
        ok = self.writes - len(errors)
        result = {
            "stored": st.stored,
            "worker_processes": len(st.workers),
            "writes": ok,
            "errors": len(errors),
            "quiet_wait_seconds": quiet_wait,
            "acked_seconds": round(acked, 2),
            "settled_seconds": round(took, 2),
            "messages_per_second": round(ok * MESSAGES_PER_WRITE / took, 1),
            "ops_per_write": round((sum(ops.values()) - own) / max(ok, 1), 1),
            "bench_ops_per_write": round(own / max(ok, 1), 1),
            "ops": {k: round(v / max(ok, 1), 1) for k, v in ops.items() if v},
            "cores": {k: round((cpu1[k] - cpu0[k]) / took, 2) for k in cpu1},
        }
        self.note(
            f"{st.stored} stored, {result['worker_processes']} worker(s): "
            f"{result['messages_per_second']} msgs/s, {result['ops_per_write']} ops/write"
        )
        return result

    async def settled(self, ctx: Any, owner: str, deadline: float, procs: dict[str, Child]) -> None:
        """Wait until every ``task.created`` event of ``owner`` is sent and each actor it fed
        has finished (the
        welcome email of the registration is not waited for: no SMTP server runs here)."""
        events = ctx.store["events"]
        mine: dict[str, Any] = {"user_id": owner, "type": "task.created"}
        fields = {"pending": 1, "dispatched_at": 1, "awaiting": 1, "finished": 1}
        while time.monotonic() < deadline:
            # Only the events not yet seen settled are read again: the store is what every
            # step measures, and reading all of them ten times a second costs it.
            docs = await events.find(mine, fields).to_list()
            left = [d["_id"] for d in docs if not event_settled(d)]
            if not left:
                return
            mine = {"_id": {"$in": left}}
            await asyncio.sleep(0.1)
        some = await events.find(mine, {"data": 0}).to_list(3)
        logs = "\n".join(f"--- {k}:\n{p.output()[-1500:]}" for k, p in procs.items())
        raise RuntimeError(f"{owner}'s events not settled in time, e.g. {some}\n{logs}")


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


def _row(s: dict[str, Any]) -> list[str]:
    cores = ", ".join(f"{k} {v:.2f}" for k, v in s["cores"].items())
    return [
        f"{s['stored']:>7} {s['worker_processes']:>7} {s.get('round', 1):>5} "
        f"{s['acked_seconds']:>8.2f} {s['settled_seconds']:>9.2f} "
        f"{s['messages_per_second']:>7.1f} {s['ops_per_write']:>9.1f}  {cores}",
        f"{'':>23}ops per write by kind (server, all clients): {s['ops']}; this benchmark's "
        f"polling {s.get('bench_ops_per_write', 0)}; errors {s['errors']}",
    ]


def median_rate(steps: list[dict[str, Any]]) -> float:
    """The median messages/s of ``steps``."""
    return statistics.median(s["messages_per_second"] for s in steps)


def report(res: dict[str, Any]) -> str:
    """The text report: one row per step, then the targets."""
    steps = res["steps"]
    head = (
        f"{'stored':>7} {'workers':>7} {'round':>5} {'acked s':>8} {'settled s':>9} "
        f"{'msgs/s':>7} {'ops/write':>9}  cores (web, worker(s), mongo)"
    )
    lines = [
        "Worker pipeline as the store grows (python -m bench pipeline): measured in one run",
        f"  services  {res.get('services', '?')}; {res.get('seconds', '?')} s in all",
        f"  each step: {res['writes']} POST /tasks (8 at a time) for a fresh user, until every "
        "event is settled (sent and every side effect finished); one stack (web + worker) "
        f"per size on its own database, the sizes in turns over {res.get('rounds', 1)} "
        "round(s) (ABBA)",
        "  ops/write: the server's operation counters over the step, less this benchmark's "
        "own polling",
        "",
        head,
    ]
    for s in steps:
        lines += _row(s)
    sizes = sorted({s["stored"] for s in steps})
    lines.append("")
    if len(sizes) >= 2:
        low, high = (
            median_rate([s for s in steps if s["stored"] == n]) for n in (sizes[0], sizes[-1])
        )
        ratio = high / low
        lines.append(
            f"throughput with {sizes[-1]:,} stored vs {sizes[0]:,} (median of each size's "
            f"steps: {high:.1f} vs {low:.1f} msgs/s): {ratio:.0%} (target >= 90 %): "
            f"{'PASS' if ratio >= 0.9 else 'MISS'}"
        )
    scaled = res.get("worker_scaling") or {}
    worst = max(s["ops_per_write"] for s in steps)
    lines.append(
        f"MongoDB operations per write, worst step: {worst:.1f} (target <= 12): "
        f"{'PASS' if worst <= 12 else 'MISS'}"
    )
    lines += scaling_lines(scaled, head)
    if scaled.get("steps"):
        capped = [s["ops_per_write"] for s in scaled["steps"]]
        lines.append(
            f"(the capped steps' {min(capped):.1f}-{max(capped):.1f} operations per write are "
            "not the pipeline's per-write cost: their writes take minutes to settle, and "
            "while the slowed workers keep the user's window full the relay looks again "
            "every 0.1 s, a few reads a round: operations per second, not per write)"
        )
    return "\n".join(lines) + "\n"


def scaling_lines(scaled: dict[str, Any], head: str) -> list[str]:
    """The worker-scaling section (see the module docstring)."""
    if not scaled:
        return []
    if "skipped" in scaled:
        return [f"two worker processes vs one: not measured ({scaled['skipped']})"]
    steps = scaled["steps"]
    by = {n: [s for s in steps if s["worker_processes"] == n] for n in (1, 2)}
    ratio = median_rate(by[2]) / median_rate(by[1])
    store = max(s["cores"].get("mongo", 0.0) for s in steps)
    headroom = store < STORE_BUSY
    lines = [
        "",
        f"Worker scaling: each worker (the Dramatiq supervisor and its worker process) held "
        f"to {scaled['cores_each']:g} of a core by a cgroup CPU quota, so that the workers, "
        f"not the test server, bind the pipeline (and the writing user given a fair-share "
        f"weight of {scaled.get('weight', 1)}, so that its window does not); one and two "
        f"workers in turns on the {steps[0]['stored']:,}-task stack",
        head,
    ]
    for s in steps:
        lines += _row(s)
    lines.append(
        f"two worker processes vs one (median {median_rate(by[2]):.1f} vs "
        f"{median_rate(by[1]):.1f} msgs/s): {ratio:.2f}x (target >= 1.6x while the store has "
        f"headroom; the store used at most {store:.2f} cores, "
        f"{'under' if headroom else 'not under'} {STORE_BUSY:g}): "
        f"{'PASS' if ratio >= 1.6 and headroom else 'MISS'}"
    )
    return lines


def main(argv: list[str]) -> int:
    """``python -m bench pipeline [--sizes 1000,20000] [--writes N]``."""
    ap = argparse.ArgumentParser(
        prog="python -m bench pipeline", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--sizes", default="1000,20000", help="tasks stored at each step")
    ap.add_argument("--writes", type=int, default=400, help="POST /tasks per step")
    ap.add_argument("--rounds", type=int, default=2, help="ABBA rounds of the sizes")
    ap.add_argument(
        "--worker-cores",
        type=float,
        default=0.06,
        help="each worker's CPU quota in the scaling comparison (cgroups); 0 skips it",
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "pipeline-latest.txt")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    ns = ap.parse_args(argv)
    sizes = tuple(int(s) for s in ns.sizes.split(",") if s)
    if not sizes or sorted(sizes) != list(sizes) or min(sizes) < 1 or ns.writes < 1:
        ap.error("--sizes: rising positive integers; --writes >= 1")
    if ns.rounds < 1 or ns.worker_cores < 0:
        ap.error("--rounds >= 1; --worker-cores >= 0")
    bench = PipelineBench(sizes, ns.writes, ns.rounds, ns.worker_cores)
    res = asyncio.run(bench.run())
    publish(report(res), None if str(ns.out) == "-" else ns.out)
    if ns.json is not None:
        ns.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
