"""Smoke test of ``python -m bench coherence``: a tiny run (8 users for 6 s, a write share of
30 % so that every user writes) with two real web processes and a worker must produce a
complete report: requests answered, every read checked, no stale read (the benchmark's exit
status says so too). The cache hit rate is reported, never asserted: speed and ratios live in
the benchmark."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.runs import run_bench

pytestmark = pytest.mark.timeout(150)


def test_coherence_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    report, res = run_bench(
        "coherence", "--users 8 --seconds 6 --rate 2 --writes 0.3", tmp_path, timeout=140
    )
    assert res["errors"] == 0, res["error_samples"]
    assert res["writes"] > 0 and res["reads"] > 0, res
    assert res["stale"] == 0, res["stale_samples"]
    assert res["cache_lookups"] >= res["reads"], res  # every read asked the cache
    for line in ("stale reads after the user's own acknowledged write: 0", "cache hit rate"):
        assert line in report, line
