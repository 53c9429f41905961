"""The platform's health in one summary: ``GET /admin/health``, ``taskmanager health`` and the
``health`` section of ``GET /admin/overview``.

Each check reads one part of the platform and says ``ok``, ``degraded``, ``failing`` or
``unknown`` (nothing recorded to judge by); the summary's status is the worst of them
(``unknown`` counts as ok):

- ``queues``: every queue's oldest waiting message against its latency objective
  (``QUEUE_LATENCY_OBJECTIVES``): a breach is degraded, and so is an objective naming no
  queue (a typo); an unreachable broker is failing;
- ``workers``: live worker processes (their registrations, workers/registry.py): none is
  failing, a queue no live worker consumes is degraded;
- ``dead_letters``: any dead-lettered message is degraded (retry or purge them);
- ``outbox``: events waiting longer than ``OUTBOX_REDELIVER_AFTER_S`` or set aside by the relay
  are degraded; an unreachable MongoDB is failing;
- ``scheduler``: no replica holding the scheduler's leader lock is degraded (no scheduled job
  fires);
- ``archiver``: the change archive's lag, from the ``state.json`` the archiver keeps beside its
  segments (core/archive.py) when this process can see ``BACKUP_DIR``; over
  :data:`ARCHIVE_LAG_LIMIT` (or three archive intervals, if longer) is degraded; ``unknown``
  when nothing is recorded.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field

from config.settings import Settings, parse_latency_objectives
from core.context import Context
from core.events import outbox_lag
from workers import queue_admin, registry
from workers.queue_inspector import backend_errors

Status = Literal["ok", "degraded", "failing"]
CheckStatus = Literal["ok", "degraded", "failing", "unknown"]
_RANK = {"unknown": 0, "ok": 0, "degraded": 1, "failing": 2}
#: The archive lag (seconds) over which the archiver check is degraded (as the
#: TaskmanagerArchiveLagHigh alert in deploy/prometheus/alerts.yaml).
ARCHIVE_LAG_LIMIT = 180.0


class QueueReading(Protocol):
    """What the checks read of a queue (a :class:`queue_admin.QueueStats`, or its API row)."""

    @property
    def queue(self) -> str: ...
    @property
    def dead(self) -> int: ...
    @property
    def oldest_age_seconds(self) -> float | None: ...


class WorkerReading(Protocol):
    """What the checks read of a worker (a :class:`registry.WorkerInfo`, or its API row)."""

    @property
    def queues(self) -> list[str]: ...
    @property
    def threads(self) -> int: ...
    @property
    def in_flight(self) -> int: ...


class QueueObjective(BaseModel):
    """One queue against its latency objective."""

    queue: str
    objective_seconds: float
    oldest_age_seconds: float | None
    met: bool | None = Field(description="None when the broker does not report the age")


class HealthCheck(BaseModel):
    """One check: its status, a line for humans, and what it measured."""

    status: CheckStatus
    detail: str
    data: dict[str, Any] = Field(default_factory=dict)


class PlatformHealth(BaseModel):
    """The worst status of the checks, and each check."""

    status: Status
    checks: dict[str, HealthCheck]


def objective(settings: Settings, stats: QueueReading) -> QueueObjective:
    """``stats``'s queue against its latency objective (met while the oldest waiting message
    is not older than the objective)."""
    limit = settings.latency_objective(stats.queue)
    age = stats.oldest_age_seconds
    return QueueObjective(
        queue=stats.queue,
        objective_seconds=limit,
        oldest_age_seconds=age,
        met=None if age is None else age <= limit,
    )


def queues_check(
    settings: Settings, stats: Sequence[QueueReading] | BaseException
) -> tuple[HealthCheck, HealthCheck]:
    """The ``queues`` and ``dead_letters`` checks from one queue reading (or its error)."""
    if isinstance(stats, BaseException):
        why = f"the broker is unreachable: {type(stats).__name__}"
        return HealthCheck(status="failing", detail=why), HealthCheck(status="unknown", detail=why)
    rows = [objective(settings, s) for s in stats]
    breached = [r.queue for r in rows if r.met is False]
    # A name that is no queue is a typo: that queue silently has the default objective.
    unknown = sorted(
        set(parse_latency_objectives(settings.queue_latency_objectives))
        - {r.queue for r in rows}
        - {"default"}
    )
    problems = []
    if breached:
        problems.append(f"over their latency objective: {', '.join(breached)}")
    if unknown:
        problems.append(f"QUEUE_LATENCY_OBJECTIVES names no queue: {', '.join(unknown)}")
    queues = HealthCheck(
        status="degraded" if problems else "ok",
        detail="; ".join(problems) or f"{len(rows)} queue(s) within their latency objective",
        data={
            "breached": breached,
            "unknown_objectives": unknown,
            "items": [r.model_dump() for r in rows],
        },
    )
    dead = {s.queue: s.dead for s in stats if s.dead}
    total = sum(dead.values())
    dead_letters = HealthCheck(
        status="degraded" if total else "ok",
        detail=f"{total} dead letter(s): {', '.join(dead)}" if total else "no dead letters",
        data={"total": total, "by_queue": dead},
    )
    return queues, dead_letters


def workers_check(
    workers: Sequence[WorkerReading] | BaseException, queues: list[str] | None
) -> HealthCheck:
    """The ``workers`` check: live processes, and the queues none of them consumes."""
    if isinstance(workers, BaseException):
        return HealthCheck(
            status="failing", detail=f"Redis is unreachable: {type(workers).__name__}"
        )
    consumed = {q for w in workers for q in w.queues}
    uncovered = sorted(set(queues or []) - consumed) if workers else []
    data = {
        "live": len(workers),
        "threads": sum(w.threads for w in workers),
        "busy": sum(w.in_flight for w in workers),
        "queues_without_worker": uncovered,
    }
    if not workers:
        return HealthCheck(status="failing", detail="no live worker process", data=data)
    if uncovered:
        return HealthCheck(
            status="degraded",
            detail=f"no live worker consumes {', '.join(uncovered)}",
            data=data,
        )
    return HealthCheck(
        status="ok",
        detail=f"{len(workers)} live worker process(es), {data['threads']} threads",
        data=data,
    )


async def outbox_check(ctx: Context) -> HealthCheck:
    """The ``outbox`` check: events the relay has not sent yet, and those it set aside."""
    try:
        lag = await outbox_lag(ctx)
    except Exception as exc:  # MongoDB unreachable, or refusing us
        return HealthCheck(status="failing", detail=f"MongoDB is unreachable: {type(exc).__name__}")
    limit = ctx.settings.outbox_redeliver_after_s
    age = lag.oldest_pending_age_seconds
    late = age is not None and age > limit
    problems = []
    if late:
        problems.append(f"the oldest pending event waited {age:.0f}s (over {limit:g}s)")
    if lag.set_aside:
        problems.append(f"{lag.set_aside} event(s) set aside (taskmanager outbox status)")
    return HealthCheck(
        status="degraded" if problems else "ok",
        detail="; ".join(problems) or f"{lag.pending} event(s) pending",
        data=lag.model_dump(),
    )


async def scheduler_check(ctx: Context) -> HealthCheck:
    """The ``scheduler`` check: which replica leads (core/leader.py, jobs/scheduler.py)."""
    try:
        raw = await ctx.redis.get(ctx.key("scheduler", "leader"))
    except Exception as exc:  # redis.RedisError, OSError
        return HealthCheck(status="unknown", detail=f"Redis is unreachable: {type(exc).__name__}")
    leader = raw.decode() if isinstance(raw, bytes) else raw
    if leader is None:
        return HealthCheck(
            status="degraded",
            detail="no scheduler replica leads: scheduled jobs do not fire",
            data={"leader": None},
        )
    return HealthCheck(status="ok", detail=f"led by {leader}", data={"leader": leader})


async def archiver_check(ctx: Context) -> HealthCheck:
    """The ``archiver`` check, from the archive's ``state.json`` when it is visible here."""
    from core.archive import STATE, archive_root

    path = archive_root(ctx.settings) / STATE
    try:
        state = json.loads(await asyncio.to_thread(path.read_text))
        covered = float(state["to"][0])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return HealthCheck(
            status="unknown",
            detail=f"no archive state recorded at {path}",
            data={"recorded": False},
        )
    try:
        raw = await ctx.redis.get(ctx.key("archiver", "leader"))
        leader = raw.decode() if isinstance(raw, bytes) else raw
    except Exception:  # redis.RedisError, OSError: the lag still says enough
        leader = None
    lag = max(0.0, time.time() - covered)
    limit = max(ARCHIVE_LAG_LIMIT, 3 * ctx.settings.archive_interval)
    data = {"recorded": True, "lag_seconds": round(lag, 1), "leader": leader}
    if lag > limit:
        return HealthCheck(
            status="degraded",
            detail=f"the archive is {lag:.0f}s behind (over {limit:g}s)",
            data=data,
        )
    return HealthCheck(status="ok", detail=f"the archive is {lag:.0f}s behind", data=data)


def _read_workers(settings: Settings) -> list[registry.WorkerInfo]:
    from config.connections import Connections

    client = Connections(settings).redis_sync()
    try:
        return registry.list_workers(client, settings.redis_prefix)
    finally:
        client.close()


async def _attempt(fn: Any, *args: Any) -> Any:
    try:
        return await asyncio.to_thread(fn, *args)
    except backend_errors() as exc:
        return exc


async def health_summary(
    ctx: Context,
    inspector: queue_admin.QueueInspector,
    *,
    stats: Sequence[QueueReading] | BaseException | None = None,
    workers: Sequence[WorkerReading] | BaseException | None = None,
) -> PlatformHealth:
    """Every check, and the worst status; ``stats`` and ``workers`` when already read (the
    overview reads them once for all its sections). Never raises for an unreachable service:
    that is what the checks report."""
    if stats is None:
        stats = await _attempt(inspector.stats)
    if workers is None:
        workers = await _attempt(_read_workers, ctx.settings)
    queues, dead = queues_check(ctx.settings, stats)
    names = None if isinstance(stats, BaseException) else [s.queue for s in stats]
    outbox, scheduler, archiver = await asyncio.gather(
        outbox_check(ctx), scheduler_check(ctx), archiver_check(ctx)
    )
    checks = {
        "queues": queues,
        "workers": workers_check(workers, names),
        "dead_letters": dead,
        "outbox": outbox,
        "scheduler": scheduler,
        "archiver": archiver,
    }
    worst = max(_RANK[c.status] for c in checks.values())
    status: Status = ("ok", "degraded", "failing")[worst]
    return PlatformHealth(status=status, checks=checks)
