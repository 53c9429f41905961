"""Smoke tests of ``python -m bench workers``: a tiny run must produce a complete report with no
errors, and the instrumented worker must write its records. Nothing here asserts speed (the
benchmark reports its targets; it never fails on them)."""

from __future__ import annotations

import json
import pstats
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from bench.procs import clean_env
from bench.worker_noop import QUEUE, bare_broker
from bench.workers import Options, WorkerBench
from cli.embedded import PrivateRedis, redis_answers
from tests.bench.runs import ROOT, run_bench

#: A tiny run.
OPTIONS = (
    "--messages 500 --rounds 1 --rate 20 --seconds 2 --drain-timeout 30 --ladder 10 "
    "--ladder-seconds 1 --profile never"
)
SECTIONS = [
    "1. No-op throughput",
    "2. Events through the real actors",
    "2b. Rate ladder",
    "3. Targets",
]
ROWS = [
    "bare Dramatiq, sync no-op",
    "ours, sync no-op",
    "ours, async no-op",
    "write → searchable",
    "write → webhook received",
    "→ relay enqueued (web)",
    "→ search entry written",
    "→ analytics folded",
    "→ webhook delivered",
    "a worker's RSS by import step",
    "no-op msgs/s through our set-up >= 90 % of bare",
    "events worker process RSS <= 100 MB",
]


@pytest.mark.timeout(150)
def test_worker_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    report, results = run_bench("workers", OPTIONS, tmp_path, timeout=140)
    for heading in SECTIONS:
        assert f"\n{heading}" in report, heading
    for row in ROWS:
        assert row in report, row

    noop = results["noop"]
    assert [r["variant"] for r in noop["runs"]] == ["bare", "ours_sync", "ours_async"]
    for run in noop["runs"]:
        assert run["errors"] == [], run
        assert run["rate"] > 0, run
        assert run["rss_mb"] > 0, run
    assert set(noop["ratio"]) == {"ours_sync", "ours_async"}
    assert "error" not in results["imports"], results["imports"]
    assert results["imports"]["total_mb"] > 0

    assert [s["offered_rate"] for s in results["ladder"]["steps"]] == [10.0]
    assert results["ladder"]["steps"][0]["acked"] == 10

    ev = results["events"]
    assert ev["writes"] == ev["acked"] == 40, ev["write_error_sample"]
    assert ev["write_errors"] == {}
    # Every task became searchable and had its webhook delivered (with a valid signature).
    assert ev["searchable_seen"] == ev["webhook_seen"] == 40
    assert ev["searchable_ms"]["p95"] is not None  # null: some task was never seen
    assert ev["server"]["analytics_folded"] == ev["server"]["events"] == 40
    assert ev["receiver"] == {"duplicates": 0, "bad_signatures": 0, "bad_bodies": 0}
    assert ev["spot_check"]["found"] == ev["spot_check"]["checked"] > 0
    assert ev["search_errors"] == {}
    assert ev["log_errors"] == {"web": [], "worker": []}
    assert ev["worker_rss_mb"] > 0
    # Every Redis key the run wrote (queues, heartbeats, cache, limits) was deleted.
    if not results["redis_private"]:
        client = redis.Redis.from_url(results["redis_url"])
        assert list(client.scan_iter(match=results["redis_prefix"] + "*")) == []


@pytest.mark.timeout(90)
def test_instrumented_worker_writes_its_records(tmp_path: Path) -> None:
    """``bench.worker_profile`` in a bare no-op worker: per-actor timings, per-thread CPU and
    a cProfile of the worker threads, written at shutdown."""
    private = None if redis_answers("redis://127.0.0.1:6379/0") else PrivateRedis().start()
    url = private.url if private else "redis://127.0.0.1:6379/0"
    namespace = f"benchtest{tmp_path.name[-8:]}:dramatiq"
    out = tmp_path / "noop.prof"
    broker, actors = bare_broker(url, namespace)
    client = redis.Redis.from_url(url)
    try:
        for _ in range(50):
            actors["noop_sync"].send()
        env = clean_env(
            BENCH_NOOP_BROKER="bare",
            BENCH_REDIS_URL=url,
            BENCH_NAMESPACE=namespace,
            BENCH_PROFILE_BROKER="bench.worker_noop:broker",
            BENCH_PROFILE_OUT=str(out),
            BENCH_PROFILE_CPU="1",
        )
        worker = subprocess.Popen(
            [
                *(sys.executable, "-m", "dramatiq", "bench.worker_noop:broker"),
                *("bench.worker_profile", "--processes", "1", "--threads", "2"),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert _drained(client, f"{namespace}:{QUEUE}.msgs", worker), "queue not drained"
        finally:
            worker.terminate()
            _, err = worker.communicate(timeout=30)
        assert worker.returncode == 0, err[-2000:]
        record = json.loads(Path(f"{out}.json").read_text())
        assert record["actors"]["noop_sync"]["messages"] == 50
        assert record["threads_cpu_s"].get("WorkerThread", 0) > 0
        stats = pstats.Stats(str(out))
        names = {name for (_file, _line, name) in stats.stats}  # type: ignore[attr-defined]
        assert "noop_sync" in names

        # The benchmark's digest and report of those records.
        bench = WorkerBench(Options())
        digest = bench.read_profile(str(out), 50, "message")
        assert digest["units"] == 50
        assert digest["cpu_s"] > 0
        assert any("noop_sync" in f["fn"] for f in digest["ours_cumulative"])
        bench.results["profiles"] = {"noop_bare_cpu": digest}
        lines: list[str] = []
        bench.report_profiles(lines.append)
        text = "\n".join(lines)
        assert "noop_bare_cpu: 50 messages" in text
        assert "top functions by self CPU:" in text
        assert "noop_sync:" in text
    finally:
        broker.close()
        keys = list(client.scan_iter(match=namespace + "*"))
        if keys:
            client.delete(*keys)
        client.close()
        if private is not None:
            private.stop()


def _drained(client: redis.Redis, msgs_key: str, worker: subprocess.Popen[str]) -> bool:
    """Poll until the no-op queue holds no unacknowledged message (bounded: 60 s)."""
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            return False
        if client.hlen(msgs_key) == 0:
            return True
        time.sleep(0.05)
    return False
