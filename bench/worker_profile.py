"""Instruments for a Dramatiq worker process, switched on by the environment.

Given as an extra module to the Dramatiq CLI (``dramatiq workers.entry:broker
bench.worker_profile ...``; the CLI takes extra modules only right after the broker), it is
imported in each worker process after the broker and before the worker threads start. With
``BENCH_PROFILE_OUT`` set it records, and writes as JSON to ``BENCH_PROFILE_OUT.json`` when the
worker shuts down:

* per actor: messages, wall time from start to finish, and queue wait (enqueue → start);
* per MongoDB command (PyMongo command monitoring): count and total round-trip time as the
  worker saw it (a listener registered before the worker's clients are made);
* the CPU seconds each thread used, by role (worker threads, consumers, the AsyncIO
  event-loop thread that runs our async actors, the heartbeat, ``to_thread`` helpers).

With ``BENCH_PROFILE_CPU=1`` as well, every thread started from now on gets its own cProfile
whose clock is the thread's CPU time (waiting on the network costs nothing, and a thread
preempted on a busy machine is not charged for it); at shutdown, when those threads have
stopped and their profiles are complete, they are merged into ``BENCH_PROFILE_OUT`` (pstats).
cProfile slows Python code down, so timings are best taken in a run without it.

``BENCH_PROFILE_BROKER`` (``module:attribute``, default ``workers.entry:broker``) names the
broker the hooks are attached to (already imported by the CLI: nothing is rebuilt).
"""

from __future__ import annotations

import cProfile
import importlib
import json
import os
import re
import sys
import threading
import time
from collections import defaultdict
from types import FrameType
from typing import Any

import dramatiq
from dramatiq.broker import MessageProxy
from pymongo import monitoring

from workers.hooks import OutcomeMiddleware

_profiles: list[cProfile.Profile] = []
_clocks: dict[int, tuple[str, int]] = {}
_lock = threading.Lock()


def _role(thread: threading.Thread) -> str:
    """What a thread does: Dramatiq's threads by class (``WorkerThread``, ``ConsumerThread``,
    ``EventLoopThread``), others by name without their sequence number."""
    kind = type(thread).__name__
    if kind not in ("Thread", "_DummyThread"):
        return kind
    return re.sub(r"[-_]?\d+(_\d+)?$", "", thread.name.split(" (", 1)[0]) or thread.name


def _register_thread(with_profile: bool) -> None:
    thread = threading.current_thread()
    ident = threading.get_ident()
    with _lock:
        _clocks[ident] = (_role(thread), time.pthread_getcpuclockid(ident))
    if with_profile:
        profile = cProfile.Profile(time.thread_time)
        with _lock:
            _profiles.append(profile)
        profile.enable()


def _clock_only(frame: FrameType, event: str, arg: Any) -> None:
    """First profile event of a new thread: note its CPU clock, then stop being called."""
    _register_thread(with_profile=False)
    sys.setprofile(None)


def _clock_and_profile(frame: FrameType, event: str, arg: Any) -> None:
    """First profile event of a new thread: replace this hook with the thread's cProfile."""
    _register_thread(with_profile=True)


class MongoTimings(monitoring.CommandListener):
    """Count and time every MongoDB command this process sends."""

    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        """A command was sent (its duration comes with the answer)."""

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        """Its answer came: add its round trip (the driver's own duration)."""
        entry = self.totals[event.command_name]
        entry[0] += 1
        entry[1] += event.duration_micros / 1000

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        """It failed (counted with its duration under ``<name>!``)."""
        entry = self.totals[event.command_name + "!"]
        entry[0] += 1
        entry[1] += event.duration_micros / 1000


class _Snapshot:
    """A profile's completed calls, for :class:`pstats.Stats`.

    ``pstats.Stats(profile)`` would call ``create_stats()``, which disables the profiler and
    closes the calls still open with the clock of the *calling* thread: the idle pool threads
    still blocked in ``SimpleQueue.get`` would be charged another thread's CPU time. Calls still
    open are left out instead (they are waits: the thread is idle).
    """

    def __init__(self, profile: cProfile.Profile):
        profile.snapshot_stats()
        self.stats: dict[Any, Any] = profile.stats

    def create_stats(self) -> None:
        """Already taken."""


class Recorder(OutcomeMiddleware):
    """Times every message by actor, and writes everything when the worker shuts down."""

    def __init__(self, out: str, mongo: MongoTimings):
        self.out = out
        self.mongo = mongo
        self.actors: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0, 0.0])
        self.running: dict[str, tuple[float, float]] = {}
        self.cpu: dict[str, float] = defaultdict(float)
        self.booted = 0.0
        self._lock = threading.Lock()

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """Start of the recording."""
        self.booted = time.monotonic()

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        """Note when the message starts and how long it waited since it was enqueued."""
        wait = max(0.0, time.time() * 1000 - message.message_timestamp)
        with self._lock:
            self.running[message.message_id] = (time.perf_counter(), wait)

    def message_ended(
        self, broker: dramatiq.Broker, message: MessageProxy, exception: BaseException | None
    ) -> None:
        """Add the message's wall time and wait to its actor's totals."""
        with self._lock:
            started = self.running.pop(message.message_id, None)
            if started is None:
                return
            entry = self.actors[message.actor_name + ("!" if exception else "")]
            entry[0] += 1
            elapsed = (time.perf_counter() - started[0]) * 1000
            entry[1] += elapsed
            entry[2] += started[1]
            entry[3] = max(entry[3], started[1])

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """Read the threads' CPU clocks while they still exist."""
        with _lock:
            clocks = dict(_clocks)
        for name, clock in clocks.values():
            try:
                self.cpu[name] += time.clock_gettime(clock)
            except OSError:
                continue

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """Merge the CPU profiles (their threads have all stopped) and write the records."""
        import pstats

        threading.setprofile(None)
        with _lock:
            profiles = list(_profiles)
        stats: pstats.Stats | None = None
        for profile in profiles:
            taken = _Snapshot(profile)
            if not taken.stats:
                continue
            if stats is None:
                stats = pstats.Stats(taken)  # type: ignore[arg-type]
            else:
                stats.add(taken)  # type: ignore[arg-type]
        if stats is not None:
            stats.dump_stats(self.out)
        record = {
            "seconds": round(time.monotonic() - self.booted, 3),
            "threads_cpu_s": {k: round(v, 4) for k, v in sorted(self.cpu.items())},
            "actors": {
                name: {
                    "messages": int(n),
                    "run_ms": round(run, 1),
                    "wait_ms": round(wait, 1),
                    "max_wait_ms": round(max_wait, 1),
                }
                for name, (n, run, wait, max_wait) in sorted(self.actors.items())
            },
            "mongo": {
                name: {"commands": int(n), "ms": round(ms, 1)}
                for name, (n, ms) in sorted(self.mongo.totals.items())
            },
        }
        with open(self.out + ".json", "w") as fh:
            json.dump(record, fh, indent=1)


def _install() -> None:
    out = os.environ.get("BENCH_PROFILE_OUT")
    if not out:
        return
    target = os.environ.get("BENCH_PROFILE_BROKER", "workers.entry:broker")
    module_name, _, attribute = target.partition(":")
    broker = getattr(importlib.import_module(module_name), attribute)
    mongo = MongoTimings()
    monitoring.register(mongo)
    broker.add_middleware(Recorder(out, mongo))
    cpu = os.environ.get("BENCH_PROFILE_CPU") == "1"
    threading.setprofile(_clock_and_profile if cpu else _clock_only)


_install()
