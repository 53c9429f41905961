"""Smoke test of ``python -m bench dr``: a tiny run (2 s archive interval, a few hundred tasks)
must produce a complete report from real processes: segments closed under steady writes, a
SIGKILLed archiver, point-in-time restores into fresh servers holding the task count the
writer's ledger says. It asserts nothing about speed: the benchmark reports its targets and
never fails on them."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from config.settings import Settings
from tests.bench.runs import run_bench

pytestmark = pytest.mark.timeout(150)

OPTIONS = "--tasks 300 --rate 20 --rpo-seconds 6 --interval 2 --concurrency default,1 --seed 3"
SECTIONS = ["1. Seed", "2. Steady writes", "3. RPO", "4. RTO", "5. Archiver CPU", "6. Targets"]


def test_dr_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    report, results = run_bench("dr", OPTIONS, tmp_path, timeout=140)
    for heading in SECTIONS:
        assert f"\n{heading}" in report, heading

    writes = results["writes"]
    assert writes["errors"] == {}
    assert writes["in_phase"] > 0

    rpo = results["rpo"]
    assert rpo["segments_in_phase"] >= 2, rpo
    # At a 2 s interval the loss window stays a few seconds (it is ~interval + 1 s).
    assert 0 < rpo["largest_loss_seconds"] < 15, rpo
    assert 0 <= rpo["real_kill_loss_seconds"] <= rpo["largest_loss_seconds"], rpo

    [first, second] = results["rto"]
    default = Settings.model_fields["restore_concurrency"].default
    assert [first["concurrency"], second["concurrency"]] == [default, 1]
    for run in results["rto"]:
        assert run["tasks_match"], run
        assert run["loaded_documents"] == results["full_backup"]["documents"], run
        assert run["events_applied"] > 0, run
        assert run["task_indexes"] > 1, run
        assert run["docs_per_second"] > 0, run
    assert results["cpu"]["archiver_seconds"] > 0
    assert "RTO <= 10 min per 100k tasks" in report
    # The archiver's leader lock (and everything else under the run's prefix) was deleted.
    if not results["redis_private"]:
        client = redis.Redis.from_url(results["redis_url"])
        assert list(client.scan_iter(match=results["redis_prefix"] + "*")) == []
