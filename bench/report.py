"""``python -m bench report`` (``make bench``): run the benchmarks one after the other in one
run and write ``BENCHMARKS.md`` with the method, each figure beside its target (PASS / MISS),
and PNG plots drawn from this run's own results (matplotlib, Agg backend).

Runs, each as ``python -m bench NAME … --json``, each bounded by a timeout: ``api`` (endpoints
beside the bare-aiohttp ceiling and the raw store), ``workers`` (no-op throughput beside bare
Dramatiq; write→effect latency at a rate ladder), ``peers`` (Dramatiq, Celery and RQ doing one
Redis INCR per message), ``growth`` (latency from 100 to 10,000 tasks per user) and ``soak``
(memory of every process, ``--soak-seconds``, 600 by default). The disaster-recovery,
fairness, pipeline and coherence figures are read from ``bench/results/dr-latest.txt``,
``fairness-latest.txt``, ``pipeline-latest.txt`` and ``coherence-latest.txt`` when present
(``python -m bench dr`` / ``fairness`` / ``pipeline`` / ``coherence`` write them), never re-run
here.

``--quick`` runs everything on tiny settings (the smoke test, tests/bench/test_report_smoke.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench.plots import draw_all
from bench.procs import note_written, written_at
from bench.report_text import document

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SECTIONS = ("api", "workers", "peers", "growth", "soak")

#: Options of each benchmark in a full run and in a quick one (the smoke test).
FULL: dict[str, list[str]] = {
    "api": [],
    "workers": ["--ladder", "2,5,10,20,30,40,80"],
    "peers": [],
    "growth": [],
    "soak": [],
}
QUICK: dict[str, list[str]] = {
    "api": ["--seconds", "0.3", "--warmup", "0.1", "--tasks", "20", "--connections", "8"],
    "workers": [
        *("--messages", "200", "--rounds", "1", "--rate", "10", "--seconds", "1"),
        *("--drain-timeout", "15", "--ladder", "5", "--ladder-seconds", "1", "--profile", "never"),
    ],
    "peers": ["--messages", "100", "--rounds", "1", "--timeout", "30"],
    "growth": ["--sizes", "10,40", "--requests", "3", "--warmup", "1", "--budget", "1"],
    "soak": ["--rate", "5", "--interval", "1", "--drain-timeout", "30"],
}
TIMEOUTS = {"api": 900, "workers": 1200, "peers": 600, "growth": 1200}


def run_one(
    name: str, args: list[str], out_dir: Path, quick: bool, timeout: float
) -> dict[str, Any]:
    """Run one benchmark; its parsed JSON, or ``{"failed": …}``."""
    txt = out_dir / f"{name}-latest.txt" if not quick else out_dir / f"{name}.txt"
    js = out_dir / f"{name}-latest.json"
    cmd = [sys.executable, "-m", "bench", name, *args, "--out", str(txt), "--json", str(js)]
    print(f"[bench report] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"failed": f"stopped after {timeout:g} s", "command": " ".join(cmd[1:])}
    if proc.returncode != 0 or not js.exists():
        tail = (proc.stdout[-1500:] + proc.stderr[-1500:]).strip()
        return {"failed": f"exit {proc.returncode}: {tail}", "command": " ".join(cmd[1:])}
    note_written(js)
    data: dict[str, Any] = json.loads(js.read_text())
    data["_command"] = "python " + " ".join(cmd[1:])
    data["_seconds"] = round(time.monotonic() - started, 1)
    data["_text"] = txt.read_text()
    return data


def machine() -> dict[str, str]:
    """CPU (from /proc/cpuinfo), memory (from ``free``), OS, Python and load."""
    model, cores = "unknown", 0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                cores += 1
    except OSError:
        pass
    try:
        free = subprocess.run(["free", "-m"], capture_output=True, text=True, timeout=10).stdout
        mem = next(ln for ln in free.splitlines() if ln.startswith("Mem:")).split()
        memory = f"{int(mem[1]):,} MB total, {int(mem[6]):,} MB available at the start (free -m)"
    except (OSError, StopIteration, IndexError, ValueError, subprocess.SubprocessError):
        memory = "unknown"
    versions = ", ".join(
        f"{p} {version(p)}"
        for p in ("aiohttp", "dramatiq", "celery", "rq", "redis", "pymongo", "SecantusDB")
    )
    return {
        "cpu": f"{cores or os.cpu_count()} x {model}",
        "memory": memory,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": versions,
        "load": f"1-min load average {os.getloadavg()[0]:.1f} at the start",
    }


def extra_results(results_dir: Path) -> dict[str, tuple[str, str]]:
    """The dr (100k tasks; RPO at the default interval), fairness and pipeline reports (text,
    date written) when present; never re-run here."""
    out = {}
    for name in ("dr", "dr-rpo", "fairness", "pipeline", "coherence"):
        path = results_dir / f"{name}-latest.txt"
        if path.exists():
            out[name] = (path.read_text(), written_at(path))
    return out


def main(argv: list[str]) -> int:
    """Run the benchmarks, draw the plots, write the report."""
    ap = argparse.ArgumentParser(prog="python -m bench report", description=__doc__.split("\n")[0])
    ap.add_argument("--soak-seconds", type=float, default=600.0, help="soak length (10 min)")
    ap.add_argument("--quick", action="store_true", help="tiny settings (the smoke test)")
    ap.add_argument("--only", default=",".join(SECTIONS), help="benchmarks to run")
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--plots", type=Path, default=ROOT / "docs" / "bench", help="PNG folder")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where results files go")
    ap.add_argument(
        "--reuse", action="store_true", help="write the report from the JSON of the last run"
    )
    ns = ap.parse_args(argv)
    only = [s for s in ns.only.split(",") if s]
    if set(only) - set(SECTIONS) or ns.soak_seconds <= 0:
        ap.error(f"--only from {','.join(SECTIONS)}; --soak-seconds > 0")
    started = datetime.now(UTC)
    t0 = time.monotonic()
    info = machine()
    ns.results.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    reused: dict[str, str] = {}
    for name in only:
        args = list((QUICK if ns.quick else FULL)[name])
        if name == "soak":
            args += ["--seconds", f"{ns.soak_seconds:g}"]
        timeout = TIMEOUTS.get(name, ns.soak_seconds + 300)
        if ns.reuse and (ns.results / f"{name}-latest.json").exists():
            reused[name] = written_at(ns.results / f"{name}-latest.json")
            data = json.loads((ns.results / f"{name}-latest.json").read_text())
            txt = ns.results / f"{name}-latest.txt"
            data["_text"] = txt.read_text() if txt.exists() else ""
            data["_command"] = f"python -m bench {name} " + " ".join(args)
            results[name] = data
        else:
            results[name] = run_one(name, args, ns.results, ns.quick, timeout)
    info["took"] = f"{time.monotonic() - t0:.0f} s"
    info["load"] += f", {os.getloadavg()[0]:.1f} at the end"
    info["started"] = started.strftime("%Y-%m-%d %H:%M UTC")
    saved = ns.results / "report-info.json"
    if ns.reuse and saved.exists():
        when = ", ".join(f"{name} {at}" for name, at in reused.items())
        info = {
            **json.loads(saved.read_text()),
            "rewritten": f"{info['started']}; each section's results as last written: {when}",
        }
    elif not ns.reuse:
        saved.write_text(json.dumps(info, indent=2))
    plots = draw_all(results, ns.plots)
    rel = os.path.relpath(ns.plots, ns.out.parent)
    text = document(results, info, plots, rel, extra_results(RESULTS), quick=ns.quick)
    ns.out.write_text(text)
    print(f"[bench report] wrote {ns.out} and {len(plots)} plot(s) in {ns.plots}", file=sys.stderr)
    failed = [name for name, r in results.items() if "failed" in r]
    for name in failed:
        print(f"[bench report] {name} failed: {results[name]['failed']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
