"""Smoke test of ``python -m bench report`` (``make bench``) on tiny settings: the peers,
growth and soak benchmarks run for real (real worker processes of Dramatiq, Celery and RQ on a
private Redis; a web process and the store; the whole platform for a few seconds), and the
report generator must write a complete BENCHMARKS.md with its PNG plots. The API and worker
benchmarks it also runs in ``make bench`` have their own smoke tests (test_bench_smoke.py,
test_workers_smoke.py). Nothing here asserts speed: the report states targets, never fails on
them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.runs import ROOT

pytestmark = pytest.mark.timeout(90)

PNG = b"\x89PNG\r\n\x1a\n"


def test_report_generator_writes_the_document_and_plots(tmp_path: Path) -> None:
    out, plots, results = tmp_path / "BENCHMARKS.md", tmp_path / "plots", tmp_path / "results"
    cmd = [
        *(sys.executable, "-m", "bench", "report", "--quick", "--only", "peers,growth,soak"),
        *("--soak-seconds", "3", "--out", str(out), "--plots", str(plots)),
        *("--results", str(results)),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=80)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    doc = out.read_text()
    for heading in (
        "## Method",
        "## Targets:",
        "## Worker throughput: Dramatiq, Celery and RQ",
        "## Growth: 100 to 10,000 tasks per user",
        "## Memory over the soak",
        "## Disaster recovery, fairness, the worker pipeline, cache coherence",
        "## Why the misses",
    ):
        assert f"\n{heading}" in doc, heading
    assert "failed in this run" not in doc
    assert "| machine | " in doc and "| load on the machine | " in doc
    for fw in ("dramatiq", "celery", "rq"):
        assert f"| {fw} " in doc, fw
    assert "What a real MongoDB changes" in doc
    # Every figure has its target and a verdict.
    rows = [ln for ln in doc.splitlines() if ln.endswith(("| PASS |", "| MISS |"))]
    assert len(rows) >= 10

    for name in ("peers.png", "growth.png", "soak.png"):
        data = (plots / name).read_bytes()
        assert data.startswith(PNG), name
        assert f"(plots/{name})" in doc, name

    peers = json.loads((results / "peers-latest.json").read_text())
    for fw, row in peers["summary"].items():
        assert row["errors"] == [], (fw, row["errors"])
        assert row["rate"] > 0, fw
    growth = json.loads((results / "growth-latest.json").read_text())
    for size in growth["sizes"].values():
        assert all(k["errors"] == 0 for k in size["kinds"].values()), size
    soak = json.loads((results / "soak-latest.json").read_text())
    assert soak["errors_5xx"] == 0, soak["statuses"]
    assert soak["dead"] == []
    assert {"web 1", "web 2", "scheduler", "worker (parent)"} <= set(soak["procs"])
    assert all(p["end_mb"] > 0 for p in soak["procs"].values())
    # The ledger: every side effect of the soak's writes exactly once.
    ledger = soak["ledger"]
    assert ledger["pass"], ledger
    assert ledger["creates"]["acknowledged"] > 0, ledger
    assert ledger["webhooks"]["expected"] >= ledger["creates"]["acknowledged"], ledger
    assert ledger["emails"]["expected"] == 4, ledger
    # The scheduled jobs fired after the load, and what they did accounted for.
    scheduled = ledger["scheduled"]
    assert scheduled["jobs"] == {
        "analytics-rollup": "succeeded",
        "due-soon-reminders": "succeeded",
    }, scheduled
    assert scheduled["rollups"]["figures"] == scheduled["rollups"]["counters"], scheduled
    assert scheduled["reminders"]["unrecorded"] == 0, scheduled
