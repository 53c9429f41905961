"""The processes of one ``taskmanager web --processes N`` (N > 1): what the parent tells its
children, and the directory where they keep their metrics.

The parent (``cli/processes.py``) starts N ordinary single-process web servers on one port
(``SO_REUSEPORT``: the kernel spreads new connections over them) and gives each, in its
environment:

- :data:`GROUP_ENV`, ``<parent pid>:<random token>``: the group's name. The children use it
  as their common name in the queue-exporter lease (``web/metrics.py``: one exporter among
  all the processes of all replicas, whichever child a scrape reaches) and to notice that
  their parent is gone (they then drain and exit rather than serve on unsupervised);
- ``PROMETHEUS_MULTIPROC_DIR``, the group's directory (:func:`make_group_dir`): with it set
  before prometheus_client is imported, every metric of every child is kept in files there
  (prometheus_client's multiprocess mode), and each child's ``/metrics`` serves their merge
  (:func:`web.metrics.scrape_registry`), so a scrape reaching any child sees the group's
  totals.

A process started without :data:`GROUP_ENV` (``--processes 1``, ``taskmanager run``) is on
its own: default registry, its own lease name, no directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from prometheus_client import multiprocess

from workers.metrics import remove_stale_dirs

#: Set in each child of a web group: ``<parent pid>:<token>``.
GROUP_ENV = "TASKMANAGER_WEB_GROUP"
#: prometheus_client's variable naming its multiprocess directory.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Name prefix of a web group's directory (suffix: the parent's pid).
DIR_PREFIX = "taskmanager-web-metrics-"


def group() -> str | None:
    """This process's group (``<parent pid>:<token>``), None when it is on its own."""
    return os.environ.get(GROUP_ENV) or None


def group_parent() -> int | None:
    """The pid of this process's group parent, None when it is on its own."""
    name = group()
    if name is None:
        return None
    pid = name.split(":", 1)[0]
    return int(pid) if pid.isdigit() else None


def metrics_dir() -> str | None:
    """The group's multiprocess directory, in a child of a web group; else None."""
    return os.environ.get(MULTIPROC_ENV) if group() is not None else None


def make_group_dir(parent_pid: int) -> Path:
    """Make (empty) the metrics directory of the group whose parent is ``parent_pid``, under
    ``$PROMETHEUS_MULTIPROC_DIR`` or the temporary directory; directories of groups whose
    parent is gone are removed first."""
    base = Path(os.environ.get(MULTIPROC_ENV) or tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    remove_stale_dirs(base, DIR_PREFIX)
    directory = base / f"{DIR_PREFIX}{parent_pid}"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o700)
    return directory


def child_gone(pid: int, directory: Path) -> None:
    """A child of the group exited: its live gauges leave the merge (its counters and
    histograms stay: they are the group's totals)."""
    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
