"""``taskmanager web`` under cProfile, switched on and off by signals.

``python -m bench.profile_web OUT.prof [web options]`` serves exactly what ``taskmanager web``
serves; SIGUSR1 starts profiling the event-loop thread, SIGUSR2 stops and writes the stats to
``OUT.prof``, so start-up, seeding and warm-up stay out of the profile.
"""

from __future__ import annotations

import cProfile
import signal
import sys
from types import FrameType

from cli.main import main as taskmanager


def main() -> None:
    """Run the web process with the profiling switches installed."""
    out, args = sys.argv[1], sys.argv[2:]
    profiler = cProfile.Profile()

    def start(signum: int, frame: FrameType | None) -> None:
        profiler.enable()

    def stop(signum: int, frame: FrameType | None) -> None:
        profiler.disable()
        profiler.dump_stats(out)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    taskmanager(["web", *args])


if __name__ == "__main__":
    main()
