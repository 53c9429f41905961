"""``taskmanager web`` with the benchmark's instruments: a profiler switch and trial patches.

``python -m bench.webproc [--profile OUT.prof] [--patches a,b] [web options]`` serves exactly
what ``taskmanager web`` serves, plus:

* ``--profile``: SIGUSR1 starts cProfile on the event-loop thread, SIGUSR2 stops it and writes
  the stats to ``OUT.prof`` (so start-up, seeding and warm-up stay out). Its clock is the
  thread's CPU time, not the wall clock: on a small machine shared with the store servers and
  the load generator the process is often preempted, and a wall clock would charge that wait
  to whichever function happened to run (mostly socket sends).
* ``--patches``: trial optimisations from :mod:`bench.patches`, applied before the app is
  built, so their gain is measured end to end against the unpatched process in the same run.
  They live here, not in the product: the lead decides what to adopt.
"""

from __future__ import annotations

import argparse
import cProfile
import signal
import sys
import time
from types import FrameType


def main() -> None:
    """Apply the instruments, then run ``taskmanager web`` with the remaining arguments."""
    ap = argparse.ArgumentParser(prog="python -m bench.webproc")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--patches", default="")
    ns, rest = ap.parse_known_args(sys.argv[1:])
    if ns.patches:
        from bench import patches

        patches.apply(ns.patches.split(","))
    if ns.profile:
        profiler = cProfile.Profile(time.thread_time)
        out = ns.profile

        def start(signum: int, frame: FrameType | None) -> None:
            profiler.enable()

        def stop(signum: int, frame: FrameType | None) -> None:
            profiler.disable()
            profiler.dump_stats(out)

        signal.signal(signal.SIGUSR1, start)
        signal.signal(signal.SIGUSR2, stop)

    from cli.main import main as taskmanager

    taskmanager(["web", *rest])


if __name__ == "__main__":
    main()
