"""Prometheus metrics of ``taskmanager archiver`` (:class:`core.archive.Archiver`).

The archiver is a process of its own: it serves these on ``HOST:ARCHIVER_METRICS_PORT/metrics``
(default 9192; 0 turns it off), read from the archiver at each scrape:

- ``taskmanager_archive_lag_seconds``: now minus the moment up to which the newest segment is
  complete (its trailer's ``covered``): what a disaster now would lose. Only the leader
  exports it (a standby replica archives nothing); right after taking the lead, the moment the
  archive reached when it took over;
- ``taskmanager_archive_leader``: 1 in the replica holding the archiver lock, else 0;
- ``taskmanager_archive_segments_written_total``: segments this process wrote;
- ``taskmanager_archive_gaps_total``: gaps this process detected (token refused, history
  rolled over, ``invalidate``, a segment missing), each healed by a new chain and a full backup;
- ``taskmanager_archive_last_gap_timestamp_seconds``: Unix time of the last of those (0: none);
- ``taskmanager_backup_replication_failures_total{target}``: copies of new segments (and of
  full backups the archiver took) to a remote target (``primary``, ``offsite``) that failed in
  this process (core/backup_replication.py); workers export the same counter for full backups.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from core import backup_replication

if TYPE_CHECKING:
    from core.archive import Archiver

NAMES = (
    "taskmanager_archive_lag_seconds",
    "taskmanager_archive_leader",
    "taskmanager_archive_segments_written_total",
    "taskmanager_archive_gaps_total",
    "taskmanager_archive_last_gap_timestamp_seconds",
)


class ArchiverCollector(Collector):
    """Reads an :class:`Archiver`'s state at each scrape."""

    def __init__(self, archiver: Archiver):
        self.archiver = archiver

    def collect(self) -> Iterator[Metric]:
        a = self.archiver
        leads = a.lock.leads
        lag = GaugeMetricFamily(
            "taskmanager_archive_lag_seconds",
            "Seconds since the moment up to which the archive is complete (leader only)",
        )
        if leads and a.covered_until is not None:
            lag.add_metric([], max(0.0, time.time() - a.covered_until))
        yield lag
        yield GaugeMetricFamily(
            "taskmanager_archive_leader",
            "1 in the archiver replica holding the lock",
            value=1.0 if leads else 0.0,
        )
        yield CounterMetricFamily(
            "taskmanager_archive_segments_written",
            "Archive segments written by this process",
            value=a.segments_written,
        )
        yield CounterMetricFamily(
            "taskmanager_archive_gaps", "Archive gaps detected by this process", value=a.gaps
        )
        yield GaugeMetricFamily(
            "taskmanager_archive_last_gap_timestamp_seconds",
            "Unix time of the last archive gap this process detected (0: none)",
            value=a.last_gap,
        )
        failed = CounterMetricFamily(
            "taskmanager_backup_replication_failures",
            "Replications of BACKUP_DIR to a remote backup target that failed (this process)",
            labels=["target"],
        )
        for target, count in sorted(backup_replication.failures.items()):
            failed.add_metric([target], count)
        yield failed


def registry_for(archiver: Archiver) -> CollectorRegistry:
    """A registry holding the archiver's metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ArchiverCollector(archiver))
    return registry


def serve(archiver: Archiver, host: str, port: int) -> Any:
    """Serve the metrics on ``host:port/metrics`` in a daemon thread; returns the server
    (``shutdown()`` it)."""
    server, _thread = start_http_server(port, addr=host, registry=registry_for(archiver))
    return server
