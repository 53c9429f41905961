"""Prometheus metrics of the worker processes: what each actor did, per queue.

Families (labels ``queue`` and ``actor``; ``queue`` is the message's own queue, never the
delay queue):

- ``taskmanager_worker_messages_processed_total``: messages run to the end, succeeded or not;
- ``taskmanager_worker_messages_failed_total``: of those, the ones whose actor raised;
- ``taskmanager_worker_messages_retried_total``: failures sent back for another attempt;
- ``taskmanager_worker_messages_dead_lettered_total``: messages rejected to the dead letters
  (retries exhausted, or a permanent failure);
- ``taskmanager_worker_message_duration_seconds``: histogram of the run time;
- ``taskmanager_worker_messages_in_progress``: messages running now;

and, unlabelled, ``taskmanager_worker_processes`` (worker processes alive, 1 per process) and
``taskmanager_worker_threads`` (their worker threads), which the "no live workers" alert and
the dashboard's worker count read.

Where they are served:

- ``taskmanager worker`` (the Dramatiq CLI forks ``--processes`` worker processes): each
  process writes its values to files (prometheus_client's multiprocess mode) in a directory
  of that worker group (``$PROMETHEUS_MULTIPROC_DIR`` or the temporary directory, plus
  ``taskmanager-worker-metrics-<pid of the Dramatiq main process>``), and one exposition
  process (a Dramatiq "fork") serves their sum on ``HOST:WORKER_METRICS_PORT/metrics``
  (default 9191; 0 turns it off). Counters of a process that exited stay in the sum (they are
  totals of the group); its in-progress, process and thread gauges leave it. Directories of
  groups whose main process is gone are removed when a new group starts.
- ``taskmanager run`` and in-process workers (``dramatiq.Worker`` over a broker built by
  :func:`workers.broker.build_broker`): the families live in the process's default registry,
  so the web app's own ``/metrics`` serves them.

The multiprocess mode is chosen on the Dramatiq CLI's ``process_boot`` signal, which only
its forked worker processes emit: there, every metric made from then on in the process writes
to the group's files (prometheus_client picks its value class once per process; the switch is
made before this middleware makes its families).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dramatiq
from dramatiq.broker import MessageProxy
from dramatiq.common import q_name
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

from config.logging import get_logger
from workers.hooks import OutcomeMiddleware

log = get_logger(__name__)

LABELS = ("queue", "actor")
#: Run-time buckets (seconds): from a cache refresh to a backup.
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
)  # fmt: skip
#: Name prefix of a worker group's multiprocess directory (suffix: the main process's pid).
DIR_PREFIX = "taskmanager-worker-metrics-"
#: Where the groups' directories are made: ``$PROMETHEUS_MULTIPROC_DIR`` as the process was
#: started with (a worker process then points the variable at its group's directory).
_BASE_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR")


@dataclass(frozen=True)
class Families:
    """The worker metric families (one set per process)."""

    processed: Counter
    failed: Counter
    retried: Counter
    dead_lettered: Counter
    duration: Histogram
    in_progress: Gauge
    processes: Gauge
    threads: Gauge

    @classmethod
    def make(cls, registry: CollectorRegistry | None) -> Families:
        """Make the families, registered on ``registry`` (None: on none, multiprocess mode)."""
        return cls(
            processed=Counter(
                "taskmanager_worker_messages_processed",
                "Messages run to the end (succeeded or failed)",
                LABELS,
                registry=registry,
            ),
            failed=Counter(
                "taskmanager_worker_messages_failed",
                "Messages whose actor raised",
                LABELS,
                registry=registry,
            ),
            retried=Counter(
                "taskmanager_worker_messages_retried",
                "Failed messages sent back for another attempt",
                LABELS,
                registry=registry,
            ),
            dead_lettered=Counter(
                "taskmanager_worker_messages_dead_lettered",
                "Messages rejected to the dead letters",
                LABELS,
                registry=registry,
            ),
            duration=Histogram(
                "taskmanager_worker_message_duration_seconds",
                "Run time of a message",
                LABELS,
                buckets=DURATION_BUCKETS,
                registry=registry,
            ),
            in_progress=Gauge(
                "taskmanager_worker_messages_in_progress",
                "Messages running now",
                LABELS,
                registry=registry,
                multiprocess_mode="livesum",
            ),
            processes=Gauge(
                "taskmanager_worker_processes",
                "Worker processes alive (each exports 1)",
                registry=registry,
                multiprocess_mode="livesum",
            ),
            threads=Gauge(
                "taskmanager_worker_threads",
                "Worker threads of the live worker processes",
                registry=registry,
                multiprocess_mode="livesum",
            ),
        )


_lock = threading.Lock()
_families: Families | None = None


def families(registry: CollectorRegistry | None = REGISTRY) -> Families:
    """This process's families, made on first use (on the default registry unless told)."""
    global _families
    with _lock:
        if _families is None:
            _families = Families.make(registry)
        return _families


def group_dir(main_pid: int) -> Path:
    """The multiprocess directory of the worker group whose Dramatiq main process is
    ``main_pid``."""
    base = _BASE_DIR or tempfile.gettempdir()
    return Path(base, f"{DIR_PREFIX}{main_pid}")


class WorkerMetrics(OutcomeMiddleware):
    """Counts processed, failed, retried and dead-lettered messages, their run time and the
    messages in progress (see the module's docstring for where they are served).

    A message counts as retried when, having failed in this process, it is enqueued again with
    Dramatiq's ``retries`` option (the Retries middleware does that after this middleware's
    ``after_process_message``, which runs first); as dead-lettered when the worker nacks it.
    """

    def __init__(self, port: int = 9191) -> None:
        #: ``WORKER_METRICS_PORT``; 0: no exposition process (the values are still kept).
        self.port = port
        self.multiprocess = False
        #: Message id -> (labels, start time) of the messages this process is running.
        self._running: dict[str, tuple[tuple[str, str], float]] = {}
        #: Ids of messages that failed here and are not yet acked or nacked.
        self._failed: set[str] = set()

    @property
    def forks(self) -> list[Any]:
        """The exposition process, in multiprocess mode with a port."""
        return [serve_group_metrics] if self.multiprocess and self.port else []

    # -- process ------------------------------------------------------------------------------

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        """A worker process of the Dramatiq CLI: switch this process to multiprocess mode."""
        directory = group_dir(os.getppid())
        directory.mkdir(parents=True, exist_ok=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
        self.multiprocess = True
        families(registry=None)

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """Count this process and its threads."""
        fams = families()
        fams.processes.set(1)
        fams.threads.set(worker.worker_threads)

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """Leave the live gauges (and, in multiprocess mode, remove this process's)."""
        fams = families()
        fams.processes.set(0)
        fams.threads.set(0)
        if self.multiprocess:
            directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
            if directory:
                multiprocess.mark_process_dead(os.getpid(), directory)  # type: ignore[no-untyped-call]

    # -- messages -----------------------------------------------------------------------------

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        """Start the clock and count the message in progress."""
        labels = (q_name(message.queue_name), message.actor_name)
        self._running[message.message_id] = (labels, time.perf_counter())
        families().in_progress.labels(*labels).inc()

    def message_ended(
        self, broker: dramatiq.Broker, message: MessageProxy, exception: BaseException | None
    ) -> None:
        """Count the message processed (and failed), with its run time."""
        started = self._running.pop(message.message_id, None)
        if started is None:
            return
        labels, start = started
        fams = families()
        fams.in_progress.labels(*labels).dec()
        fams.duration.labels(*labels).observe(time.perf_counter() - start)
        fams.processed.labels(*labels).inc()
        if exception is not None:
            fams.failed.labels(*labels).inc()
            self._failed.add(message.message_id)

    def after_skip_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        """A skipped message is no longer in progress (and was not processed)."""
        started = self._running.pop(message.message_id, None)
        if started is not None:
            families().in_progress.labels(*started[0]).dec()

    def after_enqueue(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
        """A message that failed here, sent again by the Retries middleware: retried."""
        if "retries" in message.options and message.message_id in self._failed:
            families().retried.labels(q_name(message.queue_name), message.actor_name).inc()

    def after_ack(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        """Done with the message."""
        self._failed.discard(message.message_id)

    def after_nack(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        """Rejected: it goes to the dead letters."""
        self._failed.discard(message.message_id)
        families().dead_lettered.labels(q_name(message.queue_name), message.actor_name).inc()


# -- exposition (the Dramatiq "fork" of a worker group) -------------------------------------


class _Handler(BaseHTTPRequestHandler):
    directory: str = ""

    def do_GET(self) -> None:
        """``/metrics``: the sum of the group's processes; anything else: 404."""
        if self.path.split("?", 1)[0] != "/metrics":
            self.send_error(404)
            return
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.directory)  # type: ignore[no-untyped-call]
        body = generate_latest(registry)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""


def remove_stale_dirs(base: Path, prefix: str = DIR_PREFIX) -> None:
    """Remove the multiprocess directories ``<prefix><pid>`` under ``base`` of groups whose
    main process is gone (worker groups by default; ``web/group.py`` names its own)."""
    for path in base.glob(f"{prefix}*"):
        pid = path.name.removeprefix(prefix)
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            continue


def serve_group_metrics() -> int:
    """Serve the worker group's metrics until SIGTERM (Dramatiq runs this in a process of its
    own, forked from the group's main process once the workers are up)."""
    directory = group_dir(os.getppid())
    remove_stale_dirs(directory.parent)
    directory.mkdir(parents=True, exist_ok=True)
    from config.logging import setup_logging
    from config.settings import Settings

    settings = Settings()
    setup_logging(settings, process="worker-metrics")
    handler = type("Handler", (_Handler,), {"directory": str(directory)})
    try:
        server = ThreadingHTTPServer((settings.host, settings.worker_metrics_port), handler)
    except OSError as exc:
        # Workers run on without an endpoint (Dramatiq does not stop them for a fork's exit).
        log.warning(
            "worker.metrics_unavailable",
            host=settings.host,
            port=settings.worker_metrics_port,
            error=str(exc),
        )
        return 1
    log.info("worker.metrics_serving", host=settings.host, port=settings.worker_metrics_port)
    try:
        server.serve_forever()
    finally:  # SystemExit from Dramatiq's SIGTERM handler
        with contextlib.suppress(Exception):
            server.server_close()
    return 0
