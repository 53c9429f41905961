"""Message history kept by the platform itself: processed and failed counts per minute, per
queue and per actor, in Redis, for :data:`RETENTION_SECONDS`.

Layout (the write side is :class:`workers.history.HistoryRecorder`, in every worker process):

- one hash per minute that saw messages, ``{REDIS_PREFIX}history:<minute>`` where ``<minute>``
  is the Unix time divided by 60 (the minute in which the attempt ended, by the worker's
  clock), and the same counts summed per 10 minutes in ``{REDIS_PREFIX}history:10m:<n>``
  (Unix time // 600), so the 24 h window reads 144 hashes, not 1,440;
- their fields: ``qp:<queue>`` and ``qf:<queue>`` (processed, failed of a queue),
  ``ap:<actor>`` and ``af:<actor>`` (of an actor); values are counts, summed by HINCRBY from
  every worker (:func:`add_counts`);
- each hash expires :data:`RETENTION_SECONDS` (25 h) after its period began (EXPIREAT), so a
  24 h window always finds its points.

What counts: *processed* is every attempt that ran to the end, succeeded or failed; *failed*
is the attempts whose actor raised (a subset). A message retried twice and then dead-lettered
counts 3 processed and 3 failed; one that failed once and then succeeded, 2 processed and
1 failed. The same definitions as the ``taskmanager_worker_messages_processed_total`` and
``..._failed_total`` Prometheus counters, so the dashboard and Grafana agree. Dead-lettering
is not a series of its own: the dead-letter queues (``/admin/queues``) and the Prometheus
``..._dead_lettered_total`` counter show it.

Memory bound: at most 1,650 hashes (one per minute and one per 10 minutes of 25 h, only
those that saw messages), each of at most 2 x (queues + actors + 2) fields: names are those the
broker declares, any other is counted as :data:`OTHER`, so no message can add fields. With the
catalogue's 6 queues and 11 actors that is at most 38 small fields per hash, stored as a
listpack (about 1.1 KB), so under 2 MB in all, whatever the traffic.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field

from core.context import Context

#: How long a minute's counts are kept (s): 24 h plus an hour, so the oldest 10-minute point
#: of a 24 h window is always whole.
RETENTION_SECONDS = 25 * 3600
#: The name counted for a queue or actor the broker does not declare.
OTHER = "(other)"
#: Field prefixes: (q)ueue or (a)ctor, (p)rocessed or (f)ailed.
QUEUE_PROCESSED, QUEUE_FAILED, ACTOR_PROCESSED, ACTOR_FAILED = "qp", "qf", "ap", "af"

Window = Literal["1h", "24h"]
#: Each window's step (s) and number of points.
WINDOWS: dict[str, tuple[int, int]] = {"1h": (60, 60), "24h": (600, 144)}


def history_key(prefix: str, minute: int) -> str:
    """The hash of the minute ``minute`` (Unix time // 60)."""
    return f"{prefix}history:{minute}"


def rollup_key(prefix: str, period: int) -> str:
    """The hash of the 10 minutes ``period`` (Unix time // 600)."""
    return f"{prefix}history:10m:{period}"


def field(kind: str, name: str) -> str:
    """A hash field: ``kind`` is one of the four prefixes, ``name`` a queue or actor."""
    return f"{kind}:{name}"


def expires_at(minute: int) -> int:
    """When the hash of ``minute`` expires (Unix time, for EXPIREAT)."""
    return minute * 60 + RETENTION_SECONDS


def add_counts(pipe: Any, prefix: str, counts: Mapping[tuple[int, str], int]) -> None:
    """Queue on ``pipe`` (a Redis pipeline, sync or asyncio) the commands adding ``counts``
    ((minute, field) -> count) to the minute and 10-minute hashes, with their expiry; the
    caller executes it."""
    expiry: dict[str, int] = {}
    for (minute, name), count in counts.items():
        minute_key, period_key = history_key(prefix, minute), rollup_key(prefix, minute // 10)
        pipe.hincrby(minute_key, name, count)
        pipe.hincrby(period_key, name, count)
        expiry[minute_key] = expires_at(minute)
        expiry[period_key] = expires_at(minute // 10 * 10)
    for key, when in expiry.items():
        pipe.expireat(key, when)


class HistorySeries(BaseModel):
    """One queue's or actor's counts, one per step, oldest first."""

    processed: list[int] = Field(description="Attempts run to the end (succeeded or failed)")
    failed: list[int] = Field(description="Attempts whose actor raised (included in processed)")


class History(BaseModel):
    """Processed and failed messages over a window, per queue and per actor."""

    window: Window
    step_seconds: int = Field(description="60 for 1h (60 points), 600 for 24h (144 points)")
    since: datetime = Field(description="Start of the first point (UTC)")
    until: datetime = Field(description="End of the last point (UTC); the last one is running")
    queues: dict[str, HistorySeries] = Field(
        description="Queues with at least one message in the window"
    )
    actors: dict[str, HistorySeries] = Field(
        description="Actors with at least one message in the window"
    )


class HistoryQuery(BaseModel):
    """Which window: the last hour by minute, or the last day by 10 minutes."""

    model_config = ConfigDict(extra="forbid")

    window: Window = "1h"


def bounds(window: Window, now: float) -> tuple[int, int, int, int]:
    """``(since, until, step, points)`` of ``window`` at ``now`` (Unix seconds): points are
    aligned on their step, the last one holds ``now``."""
    step, points = WINDOWS[window]
    until = (int(now) // step + 1) * step
    return until - step * points, until, step, points


async def read_history(
    client: aioredis.Redis, prefix: str, window: Window = "1h", *, now: float | None = None
) -> History:
    """The counts of ``window`` ending now, read with one pipeline of 60 HGETALLs (minutes)
    or 144 (10-minute periods)."""
    since, until, step, points = bounds(window, time.time() if now is None else now)
    pipe: Any = client.pipeline(transaction=False)
    for index in range(points):
        start = since + index * step
        pipe.hgetall(
            history_key(prefix, start // 60) if step == 60 else rollup_key(prefix, start // 600)
        )
    found: list[dict[bytes, bytes]] = await pipe.execute()
    queues: dict[str, HistorySeries] = {}
    actors: dict[str, HistorySeries] = {}
    for index, counts in enumerate(found):
        for raw_field, raw_value in counts.items():
            name_field = raw_field.decode(errors="replace")
            kind, _, name = name_field.partition(":")
            try:
                value = int(raw_value)
            except ValueError:
                continue
            if kind in (QUEUE_PROCESSED, QUEUE_FAILED):
                table = queues
            elif kind in (ACTOR_PROCESSED, ACTOR_FAILED):
                table = actors
            else:
                continue
            series = table.get(name)
            if series is None:
                series = table[name] = HistorySeries(processed=[0] * points, failed=[0] * points)
            target = series.processed if kind[1] == "p" else series.failed
            target[index] += value
    return History(
        window=window,
        step_seconds=step,
        since=datetime.fromtimestamp(since, UTC),
        until=datetime.fromtimestamp(until, UTC),
        queues=dict(sorted(queues.items())),
        actors=dict(sorted(actors.items())),
    )


async def history_summary(ctx: Context, window: Window = "1h") -> History:
    """The history of ``window`` (default the last hour) in this deployment's Redis: what
    ``GET /admin/history`` answers and the overview embeds."""
    return await read_history(ctx.redis, ctx.settings.redis_prefix, window)
