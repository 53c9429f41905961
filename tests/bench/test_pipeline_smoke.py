"""Smoke test of ``python -m bench pipeline``: a tiny run (100 and 300 tasks stored, 10
writes a step, then one capped worker against two) must produce a complete report from real
processes: every write acknowledged, each step settled (every event sent and every actor it
fed finished), MongoDB operations counted, the capped workers held to their quota. It asserts
nothing about speed: the benchmark reports its targets and never fails on them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.runs import run_bench

pytestmark = pytest.mark.timeout(200)


def test_pipeline_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    report, results = run_bench(
        "pipeline",
        "--sizes 100,300 --writes 10 --rounds 2 --worker-cores 0.3",
        tmp_path,
        timeout=190,
    )
    steps = results["steps"]
    # The sizes in turns (ABBA), each on its own stack.
    assert [(s["stored"], s["round"]) for s in steps] == [(100, 1), (300, 1), (300, 2), (100, 2)]
    scaled = results["worker_scaling"]
    if "skipped" in scaled:  # no writable cgroups (not root): said so, nothing measured
        assert "two worker processes vs one: not measured" in report
    else:
        capped = scaled["steps"]
        assert [s["worker_processes"] for s in capped] == [1, 2, 2, 1]
        assert scaled["weight"] > 1 and "fair-share weight of" in report
        for step in capped:
            # Each worker's tree is held to its 0.3 of a core (0.35: the readings' slack).
            assert step["cores"]["worker"] <= 0.35, step
        steps = steps + capped
        assert "two worker processes vs one (median" in report
    for step in steps:
        assert (step["writes"], step["errors"]) == (10, 0), step
        assert step["messages_per_second"] > 0, step
        # Each write is a transaction of two inserts at least, whatever else the actors do.
        assert step["ops"]["insert"] >= 2, step
        assert step["cores"]["mongo"] > 0, step
        # The benchmark's own polling is counted and left out of the product's figure.
        assert step["bench_ops_per_write"] > 0, step
    for line in ("throughput with 300 stored vs 100", "MongoDB operations per write"):
        assert line in report, line
