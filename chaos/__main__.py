"""``python -m chaos [--only worker,redis,…] [--load-seconds N] [--out PATH]``: run the
scenarios one after another (each bounded), print each result, write ``RELIABILITY.md``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from chaos.report import render
from chaos.rig import ROOT
from chaos.scenarios import SCENARIOS, Result

#: No scenario may take longer than this (seconds); the whole run stays under 15 minutes.
SCENARIO_TIMEOUT_S = 180.0
#: No scenario starts after this many seconds of the run (so ``make chaos`` ends in < 15 min).
RUN_BUDGET_S = 11 * 60.0
#: Scenarios the runner cannot run here, and why (listed in the report as not run).
NOT_RUN: dict[str, str] = {}


async def run(names: list[str], load_s: float) -> list[Result]:
    """Run the named scenarios, each within :data:`SCENARIO_TIMEOUT_S`."""
    results = []
    start = time.monotonic()
    for name in names:
        began = time.monotonic()
        if began - start > RUN_BUDGET_S:
            NOT_RUN[name] = f"Not run: the run's {RUN_BUDGET_S / 60:.0f}-minute budget was spent."
            continue
        print(f"chaos: {name} …", flush=True)
        try:
            result = await asyncio.wait_for(SCENARIOS[name](load_s), SCENARIO_TIMEOUT_S)
        except Exception as exc:
            traceback.print_exc()
            result = Result(name, "-", error=f"{type(exc).__name__}: {str(exc)[:300]}")
        verdict = "pass" if result.passed else "MISS"
        print(
            f"chaos: {result.name}: {verdict} failed={result.failed}/{result.failed_target} "
            f"lost={result.lost} dups={result.duplicates} redeliveries={result.redeliveries} "
            f"recover={result.recover_s:.1f}s (<= {result.recover_target_s:.0f}) "
            f"{result.extra} [{time.monotonic() - began:.0f}s]",
            flush=True,
        )
        for line in result.details[:5]:
            print(f"    {line}", flush=True)
        results.append(result)
    return results


def main(argv: list[str]) -> int:
    """Run, write the report; exit 0 when it was written (misses are in the report)."""
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__)
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    parser.add_argument("--load-seconds", type=float, default=30.0)
    parser.add_argument("--out", default=str(ROOT / "RELIABILITY.md"))
    parser.add_argument("--results", default=str(ROOT / "chaos" / "results-latest.json"))
    parser.add_argument(
        "--render-only", action="store_true", help="write --out again from --results"
    )
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")
    if args.render_only:
        # The same run's figures, rendered again (e.g. after a cause was written down).
        saved = json.loads(Path(args.results).read_text())
        results = [Result(**r) for r in saved["results"]]
        Path(args.out).write_text(render(results, saved["not_run"], saved["took_s"]))
        print(f"chaos: wrote {args.out} from {args.results}")
        return 0
    began = time.monotonic()
    results = asyncio.run(run(names, args.load_seconds))
    took = time.monotonic() - began
    Path(args.results).write_text(
        json.dumps(
            {"results": [asdict(r) for r in results], "not_run": NOT_RUN, "took_s": took},
            indent=1,
        )
    )
    Path(args.out).write_text(render(results, NOT_RUN, took))
    print(f"chaos: wrote {args.out} and {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
