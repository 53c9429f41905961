"""The registry of live workers, read side: who is running, where, and how recently each
beat.

Each worker process registers itself and refreshes its registration every second
(:class:`workers.heartbeat.WorkerHeartbeat`, the write side); ``/admin/workers``,
``taskmanager workers`` and ``taskmanager healthcheck worker`` read it through
:func:`list_workers`. A registration also carries the busy view: what each worker thread runs
now (:class:`BusyThread`), and the process's memory (RSS), processed and failed counts.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis

#: A worker registration older than this is gone (workers refresh theirs every second).
WORKER_TTL_SECONDS = 30


def _utc(ms: float) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class BusyThread:
    """A message a worker thread is running now."""

    thread: str
    actor: str
    message_id: str
    queue: str
    #: The arguments, shortened and with secret-looking values masked (workers/heartbeat.py).
    args_summary: str
    started_at: datetime
    running_seconds: float


@dataclass(frozen=True)
class WorkerInfo:
    """One live worker process, from its registration."""

    id: str
    host: str
    pid: int
    queues: list[str]
    threads: int
    state: str
    started_at: datetime
    last_beat: datetime
    heartbeat_age_seconds: float
    in_flight: int
    #: Messages run since the process started, and failed attempts (0 from older workers).
    processed: int = 0
    failed: int = 0
    #: What each busy thread runs (as of the last beat), longest running first.
    busy: list[BusyThread] = field(default_factory=list)
    #: Resident memory of the process (bytes; ``None`` when unknown), seconds since it started.
    rss_bytes: int | None = None
    uptime_seconds: float = 0.0


def registry_index(prefix: str) -> str:
    """ZSET of worker ids scored by last heartbeat (ms)."""
    return f"{prefix}workers"


def registry_key(prefix: str, worker_id: str) -> str:
    """HASH of one worker's registration."""
    return f"{prefix}workers:{worker_id}"


def list_workers(client: redis.Redis, prefix: str) -> list[WorkerInfo]:
    """Workers whose registration is alive, most recently started first."""
    now = _now_ms()
    index = registry_index(prefix)
    r: Any = client
    r.zremrangebyscore(index, "-inf", now - WORKER_TTL_SECONDS * 1000)
    ids = [m.decode() for m in r.zrange(index, 0, -1)]
    if not ids:
        return []
    pipe = r.pipeline(transaction=False)
    for worker_id in ids:
        pipe.hgetall(registry_key(prefix, worker_id))
    out = []
    for worker_id, raw in zip(ids, pipe.execute(), strict=True):
        if not raw:
            continue
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        try:
            last = int(fields["last_beat"])
            out.append(
                WorkerInfo(
                    id=worker_id,
                    host=fields["host"],
                    pid=int(fields["pid"]),
                    queues=json.loads(fields["queues"]),
                    threads=int(fields["threads"]),
                    state=fields["state"],
                    started_at=_utc(int(fields["started_at"])),
                    last_beat=_utc(last),
                    heartbeat_age_seconds=max(0.0, (now - last) / 1000),
                    in_flight=int(fields["in_flight"]),
                    processed=int(fields.get("processed", 0)),
                    failed=int(fields.get("failed", 0)),
                    busy=_busy(fields.get("busy"), now),
                    rss_bytes=int(fields["rss_bytes"]) if fields.get("rss_bytes") else None,
                    uptime_seconds=max(0.0, (now - int(fields["started_at"])) / 1000),
                )
            )
        except (KeyError, ValueError, TypeError):
            continue
    out.sort(key=lambda w: w.started_at, reverse=True)
    return out


def _busy(raw: str | None, now: int) -> list[BusyThread]:
    """The ``busy`` field of a registration (JSON list; absent from older workers)."""
    out = []
    for item in json.loads(raw) if raw else []:
        started = int(item["started_at"])
        out.append(
            BusyThread(
                thread=str(item["thread"]),
                actor=str(item["actor"]),
                message_id=str(item["message_id"]),
                queue=str(item["queue"]),
                args_summary=str(item.get("args_summary", "")),
                started_at=_utc(started),
                running_seconds=max(0.0, (now - started) / 1000),
            )
        )
    out.sort(key=lambda b: b.started_at)
    return out


def host_has_live_worker(
    client: redis.Redis, prefix: str, *, host: str | None = None, max_age: float = 30.0
) -> bool:
    """Whether a worker on ``host`` (this one by default) beat within ``max_age`` seconds."""
    host = host or socket.gethostname()
    return any(
        w.host == host and w.heartbeat_age_seconds <= max_age for w in list_workers(client, prefix)
    )
