"""Smoke test of ``python -m bench pipeline``: a tiny run (100 then 300 tasks stored, 10
writes a step) must produce a complete report from real processes: every write acknowledged,
each step settled (every event sent and every actor it fed finished), MongoDB operations
counted. It asserts nothing about speed: the benchmark reports its targets and never fails on
them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.runs import run_bench

pytestmark = pytest.mark.timeout(200)


def test_pipeline_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    report, results = run_bench("pipeline", "--sizes 100,300 --writes 10", tmp_path, timeout=190)
    steps = results["steps"]
    assert [(s["stored"], s["worker_processes"]) for s in steps] == [(100, 1), (300, 1), (300, 2)]
    for step in steps:
        assert (step["writes"], step["errors"]) == (10, 0), step
        assert step["messages_per_second"] > 0, step
        # Each write is a transaction of two inserts at least, whatever else the actors do.
        assert step["ops"]["insert"] >= 2, step
        assert step["cores"]["mongo"] > 0, step
    for line in ("throughput with 300 stored vs 100", "MongoDB operations per write"):
        assert line in report, line
