"""Cache coherence across web processes: 100 users on a 90/10 read/write mix, writes sent to
one web process and reads to another, every read checked against what its user wrote.

What runs (loopback only, bounded, stopped here): SecantusDB in memory, Redis (the machine's
under a unique key prefix, else a private one; every key deleted at the end), two
``taskmanager web`` processes (A takes the writes, B the reads) and one
``taskmanager worker`` (the cache warm-up actor refreshes a user's entries after each write,
as in production).

Each user is one coroutine of the load generator (this process), open loop: it waits a random
think time (exponential, mean ``1 / --rate`` s), then writes (10 %: ``POST /tasks`` to A) or
reads (90 %: ``GET /tasks/stats`` or the first page of ``GET /tasks`` from B, alternately).
Only that coroutine writes for its user, so after each acknowledged write it knows exactly
what any later read must show: the stats' ``total`` is its count of tasks and the first page
starts with its last task. A read that shows less is *stale*.

Before the measured loops each user reads both values once from B (cold misses are not the
steady state). Reported: requests and their latencies, stale reads (target 0), the cache hit
rate of B's reads (``cache_requests_total`` from B's ``/metrics``; target ≥ 95 %) and the
share of B's admissions answered in process with no Redis round trip
(``local_cache_admissions_total``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bench.api import API, PASSWORD, SECRET
from bench.procs import Services, product_env, publish, taskmanager_exe, wait_http
from cli.embedded import free_port

RESULTS = Path(__file__).parent / "results"


class CoherenceBench:
    """One run: the store, two web processes and a worker, then the users' loops."""

    def __init__(self, users: int, seconds: float, rate: float, write_share: float):
        self.users, self.seconds, self.rate, self.write_share = users, seconds, rate, write_share
        self.ports = free_port(), free_port()
        self.latencies: dict[str, list[float]] = {"write": [], "read": []}
        self.stale: list[str] = []
        self.errors: list[str] = []

    def note(self, text: str) -> None:
        """Progress on stderr."""
        print(f"[bench coherence] {text}", file=sys.stderr, flush=True)

    def url(self, which: int, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[which]}{path}"

    async def run(self) -> dict[str, Any]:
        """Everything, stopped at the end whatever happens."""
        started = time.monotonic()
        svc = Services.start()
        try:
            env = product_env(svc, SECRET)
            webs = [
                svc.spawn(f"web-{n}", [taskmanager_exe(), "web", "--port", str(port)], env)
                for n, port in zip("ab", self.ports, strict=True)
            ]
            svc.spawn("worker", [taskmanager_exe(), "worker", "--processes", "1"], env)
            for n, web in enumerate(webs):
                await wait_http(web, self.url(n, "/readyz"), timeout=60)
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as http:
                # Sign-ups a few at a time: the web sheds bursts of password hashing (503).
                gate = asyncio.Semaphore(2)
                tokens = await asyncio.gather(
                    *(self.register(http, gate, i) for i in range(self.users))
                )
                await asyncio.sleep(2)  # the welcome side effects settle
                # Each user's first read of each cached value misses (nothing was computed
                # yet): those cold misses are not the steady state measured.
                for token in tokens:
                    auth = {"Authorization": f"Bearer {token}"}
                    for path in (f"{API}/tasks/stats", f"{API}/tasks"):
                        async with http.get(self.url(1, path), headers=auth) as resp:
                            await resp.read()
                before = await self.metrics(http)
                t0 = time.monotonic()
                await asyncio.gather(*(self.user(http, token, i) for i, token in enumerate(tokens)))
                elapsed = time.monotonic() - t0
                after = await self.metrics(http)
            return self.results(before, after, elapsed, svc, time.monotonic() - started)
        finally:
            svc.stop()

    async def register(self, http: aiohttp.ClientSession, gate: asyncio.Semaphore, i: int) -> str:
        body = {"email": f"c{i}-{time.time_ns()}@example.com", "password": PASSWORD, "name": "C"}
        async with gate, http.post(self.url(0, f"{API}/auth/register"), json=body) as resp:
            if resp.status != 201:
                raise RuntimeError(f"register: {resp.status} {await resp.text()}")
            return str((await resp.json())["access_token"])

    async def user(self, http: aiohttp.ClientSession, token: str, i: int) -> None:
        """One user's loop: think, then write to A or read from B and check the read."""
        rng = random.Random(i)
        auth = {"Authorization": f"Bearer {token}"}
        count, last_id, reads = 0, None, 0
        deadline = time.monotonic() + self.seconds
        await asyncio.sleep(rng.random() / self.rate)  # spread the starts
        while time.monotonic() < deadline:
            await asyncio.sleep(rng.expovariate(self.rate))
            t = time.perf_counter()
            try:
                if rng.random() < self.write_share:
                    path = self.url(0, f"{API}/tasks")
                    async with http.post(path, json={"title": f"t{count}"}, headers=auth) as r:
                        if r.status != 201:
                            self.errors.append(f"POST {r.status}")
                            continue
                        last_id, count = (await r.json())["id"], count + 1
                    self.latencies["write"].append(time.perf_counter() - t)
                    continue
                reads += 1
                stats = reads % 2 == 0
                path = self.url(1, f"{API}/tasks/stats" if stats else f"{API}/tasks")
                async with http.get(path, headers=auth) as r:
                    if r.status != 200:
                        self.errors.append(f"GET {r.status}")
                        continue
                    body = await r.json()
                self.latencies["read"].append(time.perf_counter() - t)
                if stats and body["total"] != count:
                    self.stale.append(f"user {i}: stats total {body['total']}, wrote {count}")
                elif not stats and count and body["items"][0]["id"] != last_id:
                    self.stale.append(f"user {i}: first page does not start with {last_id}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.errors.append(repr(exc))

    async def metrics(self, http: aiohttp.ClientSession) -> dict[str, float]:
        """B's cache and admission counters."""
        async with http.get(self.url(1, "/metrics")) as resp:
            text = await resp.text()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "cache_requests_total":
                    key = f"cache {sample.labels['cache']} {sample.labels['result']}"
                elif sample.name == "local_cache_admissions_total":
                    key = f"local {sample.labels['result']}"
                else:
                    continue
                out[key] = out.get(key, 0.0) + sample.value
        return out

    def results(
        self,
        before: dict[str, float],
        after: dict[str, float],
        elapsed: float,
        svc: Services,
        total: float,
    ) -> dict[str, Any]:
        delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}

        def share(hit: str, keys: list[str]) -> float:
            all_ = sum(delta.get(k, 0.0) for k in keys)
            return delta.get(hit, 0.0) / all_ if all_ else 0.0

        caches = {k.split()[1] for k in delta if k.startswith("cache ")}
        hits = sum(delta.get(f"cache {c} hit", 0.0) for c in caches)
        lookups = sum(v for k, v in delta.items() if k.startswith("cache "))
        return {
            "users": self.users,
            "seconds": round(elapsed, 1),
            "asked_seconds": self.seconds,
            "rate_per_user": self.rate,
            "write_share": self.write_share,
            "writes": len(self.latencies["write"]),
            "reads": len(self.latencies["read"]),
            "errors": len(self.errors),
            "error_samples": self.errors[:5],
            "stale": len(self.stale),
            "stale_samples": self.stale[:5],
            "cache_hit_rate": hits / lookups if lookups else 0.0,
            "cache_lookups": int(lookups),
            "per_cache": {
                c: round(share(f"cache {c} hit", [f"cache {c} hit", f"cache {c} miss"]), 4)
                for c in caches
            },
            "local_hit_share": share("local hit", ["local hit", "local miss"]),
            "p50_ms": {k: _pct(v, 50) for k, v in self.latencies.items()},
            "p95_ms": {k: _pct(v, 95) for k, v in self.latencies.items()},
            "services": f"SecantusDB {version('SecantusDB')} in memory; Redis "
            f"{svc.redis_version()} ({svc.redis_source})",
            "total_seconds": round(total, 1),
        }


def _pct(values: list[float], p: int) -> float:
    if len(values) < 2:
        return round(1000 * values[0], 1) if values else 0.0
    return round(1000 * statistics.quantiles(values, n=100)[p - 1], 1)


def report(res: dict[str, Any]) -> str:
    """The text report."""
    ok_stale = "PASS" if res["stale"] == 0 else "MISS"
    ok_hits = "PASS" if res["cache_hit_rate"] >= 0.95 else "MISS"
    lines = [
        "Cache coherence benchmark: two web processes, writes to A, reads from B, one run",
        f"  command   python -m bench coherence --users {res['users']} --seconds "
        f"{res['asked_seconds']:g} --rate {res['rate_per_user']:g} --writes {res['write_share']:g}",
        f"  when      {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{res['total_seconds']:.0f} s in all",
        f"  store     {res['services']}",
        f"  load      {res['users']} users, each ~{res['rate_per_user']} requests/s (exponential "
        f"think time), {res['write_share']:.0%} writes; reads alternate stats / first page",
        "",
        f"requests over {res['seconds']:.0f} s: {res['writes']:,} writes to A, "
        f"{res['reads']:,} reads from B, "
        f"{res['errors']} errors {res['error_samples'] or ''}",
        f"latency p50 / p95: writes {res['p50_ms']['write']} / {res['p95_ms']['write']} ms, "
        f"reads {res['p50_ms']['read']} / {res['p95_ms']['read']} ms",
        f"stale reads after the user's own acknowledged write: {res['stale']}   target 0   "
        f"{ok_stale} {res['stale_samples'] or ''}",
        f"cache hit rate of B's reads: {res['cache_hit_rate']:.1%} of {res['cache_lookups']:,} "
        f"lookups {res['per_cache']}   target >= 95 %   {ok_hits}",
        f"B's admissions answered in process (no Redis round trip): {res['local_hit_share']:.1%}",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """``python -m bench coherence [--users N] [--seconds S] [--rate R]``."""
    ap = argparse.ArgumentParser(
        prog="python -m bench coherence", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=30.0, help="length of the users' loops")
    ap.add_argument("--rate", type=float, default=1.0, help="requests per second per user")
    ap.add_argument("--writes", type=float, default=0.1, help="share of writes")
    ap.add_argument("--out", type=Path, default=RESULTS / "coherence-latest.txt")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    ns = ap.parse_args(argv)
    if ns.users < 1 or ns.seconds <= 0 or ns.rate <= 0 or not 0 < ns.writes < 1:
        ap.error("--users >= 1, --seconds > 0, --rate > 0, 0 < --writes < 1")
    res = asyncio.run(CoherenceBench(ns.users, ns.seconds, ns.rate, ns.writes).run())
    publish(report(res), None if str(ns.out) == "-" else ns.out)
    if ns.json is not None:
        ns.json.write_text(json.dumps(res, indent=2))
    return 0 if res["stale"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
