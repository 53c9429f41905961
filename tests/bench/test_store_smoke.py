"""Smoke test of ``python -m bench store``: a tiny run (300 writes to each of two fresh
embedded servers, in blocks of 100; then findAndModify against an update and a read at two
collection sizes) must time every block of both variants, in turns, and both ways at each
size. It asserts nothing about speed: the benchmark reports the rates and never fails on
them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.runs import run_bench

pytestmark = pytest.mark.timeout(120)


def test_store_benchmark_runs_both_variants(tmp_path: Path) -> None:
    report, results = run_bench(
        "store", "--writes 300 --block 100 --fam-ops 4 --fam-sizes 50,200", tmp_path, timeout=110
    )
    variants = results["variants"]
    assert [v["retry_writes"] for v in variants] == [True, False]
    for variant in variants:
        assert variant["writes"] == 300
        assert len(variant["rates"]) == 3 and all(rate > 0 for rate in variant["rates"])
    assert "last block:" in report
    assert "retryWrites=false (the embedded URL)" in report
    fam = results["find_and_modify"]
    assert [row["documents"] for row in fam] == [50, 200]
    assert all(row["find_and_modify_ms"] > 0 and row["update_read_ms"] > 0 for row in fam)
    assert "findAndModify by _id against update_one by _id + find_one by _id" in report
