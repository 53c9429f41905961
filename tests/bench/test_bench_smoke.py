"""Smoke test of ``python -m bench api``: a tiny run (with a profile and the trial patches)
must produce a complete report with no errors. It asserts nothing about speed: the benchmark
reports its targets and never fails on them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from tests.bench.runs import run_bench

pytestmark = pytest.mark.timeout(120)

#: A tiny run, with a profile and the trial patches (opt-in in `make bench`).
OPTIONS = (
    "--seconds 0.4 --warmup 0.2 --tasks 30 --profile stats --trials all "
    "--trial-endpoints stats --trial-rounds 1 --trial-seconds 0.4 --share-rounds 2"
)
LABELS = [
    "GET /tasks",
    "GET /tasks?status=todo",
    "GET /tasks/{id}",
    "GET /tasks/stats",
    "POST /tasks",
]


def test_api_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    report, results = run_bench("api", OPTIONS, tmp_path, timeout=110)

    assert [e["label"] for e in results["endpoints"].values()] == LABELS
    for key, endpoint in results["endpoints"].items():
        for kind in ("http", "raw", "raw_queries"):
            measured = endpoint[kind]
            assert measured["errors"] == {}, (key, kind, measured["error_sample"])
            assert measured["ok"] > 0, (key, kind)
        assert f"\n{endpoint['label']} " in report
    # The cached endpoints were measured on their cache-hit path, as the raw store mirrors.
    assert results["endpoints"]["list"]["cache_hit_ratio"] == 1.0
    assert results["endpoints"]["stats"]["cache_hit_ratio"] == 1.0
    assert results["ceiling"]["ok"] > 0
    assert results["web_rss_mb"] > 0
    assert "web process RSS after the run" in report
    # The cached reads were measured in turns with the ceiling, each round both ways.
    share = results["share"]
    assert [len(share["rps"][k]) for k in ("ceiling", "stats", "list")] == [2, 2, 2]
    assert all(v > 0 for k in ("ceiling", "stats", "list") for v in share["rps"][k])
    assert share["shares"]["stats"] > 0
    assert share["shares"]["list"] > 0
    assert "cached reads in turns with the ceiling" in report
    # The profile and the trial patches ran too (they are opt-in in `make bench`).
    [profile] = results["profiles"]
    assert profile["endpoint"] == "GET /tasks/stats"
    assert profile["requests"] > 0
    assert profile["categories"]
    assert "profile of GET /tasks/stats" in report
    for name in ("none", "all"):
        [trial] = results["trials"][name]["stats"]
        assert trial["errors"] == {}, (name, trial["error_sample"])
        assert trial["ok"] > 0
    # Every Redis key the run wrote (cache, limits, broker queues) was deleted.
    if not results["redis_private"]:
        client = redis.Redis.from_url(results["redis_url"])
        assert list(client.scan_iter(match=results["redis_prefix"] + "*")) == []


def test_a_process_trees_children_and_cpu() -> None:
    """``children`` finds what a process forked (and only that); ``tree_cpu`` adds their CPU
    to the parent's: the child here spins for 0.5 s of CPU while its parent sleeps."""
    import subprocess
    import sys
    import time

    from bench.procs import children, proc_cpu, tree_cpu

    code = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    end = time.process_time() + 0.5\n"
        "    while time.process_time() < end: pass\n"
        "    time.sleep(5); os._exit(0)\n"
        "print('forked', flush=True); time.sleep(5)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    with parent:
        assert parent.stdout is not None and parent.stdout.readline() == "forked\n"
        forked = children(parent.pid)
        assert len(forked) == 1 and children(forked[0]) == []
        deadline = time.monotonic() + 10
        while proc_cpu(forked[0]) < 0.4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tree_cpu(parent.pid) >= proc_cpu(parent.pid) + 0.4
        parent.kill()
