"""Smoke test of ``python -m bench fairness``: a tiny run must measure both modes completely,
with no errors. Nothing here asserts speed (the benchmark reports its targets; it never fails
on them)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.fairness import (
    FairnessBench,
    ModeResult,
    _where,
    burst_sizes,
    command_line,
    jain,
    merge,
    model,
    p95,
    parse,
    run_order,
)
from bench.report_text import written_by
from tests.bench.runs import run_bench

#: A tiny run.
OPTIONS = "--burst 40 --probes 2 --idle-probes 1 --users 8 --max-burst 4 --timeout 150"
ROWS = [
    "idle: write → searchable",
    "burst: write → webhook",
    "A's drain time (s)",
    "Jain over per-user mean delay",
    "Jain over per-user slowdown",
    "round-robin",
    "3. Targets (fairness on)",
    "A's drain time grows",
]


@pytest.mark.timeout(300)
def test_fairness_benchmark_runs_both_modes(tmp_path: Path) -> None:
    report, results = run_bench("fairness", OPTIONS, tmp_path, timeout=290)
    for row in ROWS:
        assert row in report, row
    assert "Errors:" not in report, report
    modes = results["modes"]
    assert set(modes) == {"off", "on"}
    for mode in modes.values():
        assert mode["errors"] == [], mode["errors"]
        assert len(mode["idle_search"]) == 1 and len(mode["burst_hook"]) == 2
        # Every probe was seen (an unseen one is null), every user's tasks indexed.
        assert None not in mode["idle_search"] + mode["burst_search"] + mode["burst_hook"]
        assert len(mode["users_mean_delay_s"]) == 8
        assert mode["a_drain_s"] > 0
        assert 0 < mode["jain_delay"] <= 1
        assert 0 < mode["jain_slowdown"] <= 1


def test_the_figures_helpers() -> None:
    assert jain([2.0, 2.0, 2.0]) == pytest.approx(1.0)
    assert jain([1.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)
    assert p95([float(i) for i in range(1, 101)]) == 95.0
    # A probe unseen within the limit (NaN) is later than any seen one.
    assert p95([1.0, math.nan, 2.0]) == math.inf
    assert burst_sizes(5, 9) == [1, 1, 3, 5, 9]


def test_the_model_of_ideal_policies() -> None:
    """Two users, bursts of 1 and 3, the big one written first. FIFO: the big one's tasks end
    at 1, 2, 3 and the small one's at 4 (slowdowns 1 and 4); round-robin: 1, 3, 4 and 2
    (slowdowns 4/3 and 2)."""
    figures = model([1, 3], [1, 0])
    assert figures["fifo"] == (pytest.approx(jain([4.0, 2.0])), pytest.approx(jain([4.0, 1.0])))
    assert figures["round-robin"] == (
        pytest.approx(jain([2.0, 8 / 3])),
        pytest.approx(jain([2.0, 4 / 3])),
    )


def test_rounds_alternate_pair_up_and_merge() -> None:
    """With --rounds the modes alternate (ABBA), A's drain growth is the median over pairs of
    runs that ran one after the other, and each mode's runs merge into its figures."""
    assert run_order(1) == ["off", "on"]
    assert run_order(3) == ["off", "on", "on", "off", "off", "on"]

    def ran(mode: str, drain: float, probe: float, jain_index: float) -> ModeResult:
        return ModeResult(
            mode,
            idle_search=[probe],
            burst_search=[probe * 2],
            a_drain_s=drain,
            a_drain_ops=100,
            a_drain_cpu={"store": drain / 2},
            jain_delay=jain_index,
            jain_slowdown=jain_index / 2,
            users_mean_delay_s={f"u00{len(mode)}{drain}": drain},
        )

    bench = FairnessBench(parse(["--rounds", "2", "--out", "-"]))
    bench.runs = [
        ran("off", 50.0, 0.2, 0.9),
        ran("on", 60.0, 0.3, 0.8),
        ran("on", 52.0, 0.4, 1.0),
        ran("off", 52.0, 0.1, 0.7),
    ]
    assert [(off.a_drain_s, on.a_drain_s) for off, on in bench.pairs()] == [(50, 60), (52, 52)]
    assert bench.drain_growths() == [(pytest.approx(0.2), ""), (pytest.approx(0.0), "")]
    on = merge("on", [r for r in bench.runs if r.mode == "on"])
    assert on.a_drain_s == 56.0 and on.jain_delay == pytest.approx(0.9)
    assert on.idle_search == [0.3, 0.4] and on.burst_search == [0.6, 0.8]
    assert on.a_drain_cpu == {"store": pytest.approx(28.0)} and on.a_drain_ops == 100
    assert len(on.users_mean_delay_s) == 2
    assert merge("off", [bench.runs[0]]) is bench.runs[0]
    bench.modes = {m: merge(m, [r for r in bench.runs if r.mode == m]) for m in ("off", "on")}
    bench.results["started_at"] = "now"
    bench.results["command"] = command_line(["--rounds", "2", "--out", "x.txt", "--json=y"])
    report = bench.report()
    assert report.startswith("Fairness benchmark (python -m bench fairness --rounds 2)\n")
    # BENCHMARKS.md quotes the report with the command it names.
    assert written_by("fairness", "", report) == "python -m bench fairness --rounds 2"
    assert written_by("fairness", "", "") == "python -m bench fairness"
    assert written_by("dr", "python -m bench dr", report) == "python -m bench dr"
    assert "A's drain time (s), median" in report
    assert "50.0 / 60.0, +20.0 %; 52.0 / 52.0, +0.0 %" in report
    assert "MISS  A's drain time grows +10.0 % (median of the pairs of runs)" not in report
    assert "PASS  A's drain time grows +10.0 % (median of the pairs of runs)" in report
    with pytest.raises(SystemExit):
        parse(["--rounds", "0"])

    # A drain given up (not over within the bound) bounds the growth: fairness off not over
    # after 600 s while on drained in 240 s is a growth under -60 %, a pass; the other way
    # round a growth over +150 %, no proof of anything below the target.
    gave_up = ModeResult("off", a_drain_unfinished_s=600.0)
    bench.runs = [gave_up, ran("on", 240.0, 0.3, 0.8)]
    assert bench.drain_growths() == [(pytest.approx(-0.6), "<")]
    assert bench.drain_growth() == (pytest.approx(-0.6), "<", True)
    bench.runs = [ran("off", 240.0, 0.3, 0.8), ModeResult("on", a_drain_unfinished_s=600.0)]
    assert bench.drain_growth() == (pytest.approx(1.5), ">", False)
    # A mode that failed in one run (no Jain figures) is merged from the others'.
    assert merge("off", [gave_up, ran("off", 240.0, 0.3, 0.8)]).jain_delay == pytest.approx(0.8)
    bench.runs = [gave_up, ModeResult("on")]
    assert math.isnan(bench.drain_growth()[0]) and not bench.drain_growth()[2]
    bench.opts.rounds = 1
    bench.runs = [gave_up, ran("on", 240.0, 0.3, 0.8)]
    bench.modes = {"off": gave_up, "on": bench.runs[1]}
    report = bench.report()
    assert "A's drain time (s)                        >600.0         240.0" in report
    assert "PASS  A's drain time grows <-60.0 % (<= 10 %; a drain not over after 600 s" in report


def test_budget_option_and_where_a_mode_failed(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse(["--budget", "64"]).budget == 64
    assert parse([]).budget == 0  # the product's default: no budget
    with pytest.raises(SystemExit):
        parse(["--budget", "-1"])
    assert "--budget must be 0 (none) or more" in capsys.readouterr().err

    def step() -> None:
        raise TimeoutError("slow")

    try:
        step()
    except TimeoutError as exc:
        where = _where(exc)
    assert where.startswith("test_fairness_smoke.py:") and where.endswith(" in step")
    assert _where(TimeoutError()) == "outside the benchmark's code"


def test_results_carry_when_they_were_written(tmp_path: Path) -> None:
    """A clone's files all have its checkout's mtime: the report reads when a result was
    written from the book publish() keeps beside the results."""
    import os

    from bench.procs import WRITTEN, publish, written_at

    out = tmp_path / "x-latest.txt"
    publish("report\n", out)
    recorded = written_at(out)
    os.utime(out, (0, 0))  # as if checked out at another time
    assert written_at(out) == recorded
    assert (tmp_path / WRITTEN).exists()
    other = tmp_path / "y-latest.txt"
    other.write_text("no record")
    os.utime(other, (86_400, 86_400))
    assert written_at(other) == "1970-01-02 00:00 UTC"  # no record: its mtime
