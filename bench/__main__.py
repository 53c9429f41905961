"""``python -m bench [NAME] [options]``: run one benchmark, or every one with no name.

Each prints its report and writes it to ``bench/results/<name>-latest.txt``. Options follow a
name (``python -m bench api --help``). ``make bench`` runs ``report``, which runs api, workers,
peers, growth and soak in one run and writes BENCHMARKS.md (dr and fairness are read from
their results files, not re-run).

- ``api``: throughput and latency of the task endpoints beside the bare-aiohttp ceiling and
  the raw store cost, in one run (bench/api.py);
- ``steps``: the CPU cost of single steps of a request (bench/steps.py);
- ``workers``: no-op throughput of our broker set-up beside bare Dramatiq, and events through
  the real actors at a steady write rate with write-to-effect latencies (bench/workers.py);
- ``dr``: disaster recovery with real processes: the archiver's RPO under steady writes, the
  RTO of a point-in-time restore of 100k tasks, the archiver's CPU per 1,000 writes
  (bench/dr.py);
- ``fairness``: one user's burst beside another's writes, and 100 users' bursts, with fair
  dispatch off and on side by side (bench/fairness.py);
- ``peers``: bare Dramatiq, Celery and RQ doing one Redis INCR per message (bench/peers.py);
- ``growth``: list, search, stats and activity latency from 100 to 10,000 tasks per user
  (bench/growth.py);
- ``pipeline``: worker throughput and MongoDB operations per write with 1,000 and 20,000 tasks
  stored, and with two worker processes (bench/pipeline.py);
- ``coherence``: 100 users on a 90/10 read/write mix with writes to one web process and reads
  to another: stale reads, cache hit rate, reads answered in process (bench/coherence.py);
- ``store``: the embedded server's write rate as writes accumulate, with PyMongo's retryable
  writes on and off side by side (why the embedded URL turns them off; bench/store.py);
- ``soak``: memory of every process over a soak under a mixed load (bench/soak.py);
- ``report``: ``make bench``: runs api, workers, peers, growth and soak and writes
  BENCHMARKS.md with plots in docs/bench/ (bench/report.py).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

#: name -> the module whose ``main(argv)`` returns an exit status. Imported on use, so one
#: benchmark's imports never stop another from running.
BENCHMARKS: dict[str, str] = {
    "api": "bench.api",
    "steps": "bench.steps",
    "workers": "bench.workers",
    "dr": "bench.dr",
    "fairness": "bench.fairness",
    "peers": "bench.peers",
    "growth": "bench.growth",
    "pipeline": "bench.pipeline",
    "coherence": "bench.coherence",
    "store": "bench.store",
    "soak": "bench.soak",
    #: Runs api, workers, peers, growth and soak and writes BENCHMARKS.md (``make bench``).
    "report": "bench.report",
}


def runner(name: str) -> Callable[[list[str]], int]:
    """The ``main`` of benchmark ``name``."""
    run: Callable[[list[str]], int] = importlib.import_module(BENCHMARKS[name]).main
    return run


def main(argv: list[str]) -> int:
    """Dispatch to the named benchmark (options follow the name), or run all of them."""
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("benchmarks: " + ", ".join(BENCHMARKS))
        return 0
    if argv and not argv[0].startswith("-"):
        name, rest = argv[0], argv[1:]
        if name not in BENCHMARKS:
            print(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
            return 2
        return runner(name)(rest)
    if argv:
        print("options follow a benchmark's name: python -m bench NAME [options]", file=sys.stderr)
        return 2
    status = 0
    for name in BENCHMARKS:
        if name == "report":  # runs the others again; ``python -m bench report`` on its own
            continue
        status = max(status, runner(name)([]))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
