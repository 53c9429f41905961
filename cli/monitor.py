"""The overview commands: ``taskmanager workers`` (each live worker process and what its
threads run), ``taskmanager stats`` (platform totals, optionally repeated with ``--watch``), in
the manner of ``rq info`` and ``sidekiqmon``, and ``taskmanager health`` (the checks of
``GET /admin/health``, with an exit status scripts can alert on). All only read, so they need
no ``JWT_SECRET``."""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, cast

import click

from cli.common import broker_settings, echo_json, echo_table, iso, load_settings, run_async
from config.connections import Connections
from config.settings import Settings


def _registry(settings: Settings) -> list[Any]:
    from workers.queue_inspector import backend_errors
    from workers.registry import list_workers

    client = Connections(settings).redis_sync()
    try:
        return list_workers(client, settings.redis_prefix)
    except backend_errors() as exc:
        raise click.ClickException(f"Redis (REDIS_URL) is unreachable: {exc}") from exc
    finally:
        client.close()


def _worker_settings() -> Settings:
    settings = broker_settings()
    if settings.redis_url is None:
        raise click.ClickException("REDIS_URL must be set (or --redis-url): workers register there")
    return settings


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def workers(as_json: bool) -> None:
    """Live worker processes: host, pid, state, threads, busy (running now), processed and
    failed (since the process started), resident memory, uptime and last beat; under each,
    what its busy threads run (thread, actor, queue, message id, for how long, arguments)."""
    found = _registry(_worker_settings())
    if as_json:
        echo_json([dataclasses.asdict(w) for w in found])
        return
    if not found:
        click.echo("no live workers")
        return
    echo_table(
        [
            "ID",
            "HOST",
            "PID",
            "STATE",
            "THREADS",
            "BUSY",
            "PROCESSED",
            "FAILED",
            "RSS",
            "UPTIME",
            "STARTED",
            "BEAT",
        ],
        [
            [
                w.id[:12],
                w.host,
                str(w.pid),
                w.state,
                str(w.threads),
                str(w.in_flight),
                str(w.processed),
                str(w.failed),
                _mib(w.rss_bytes),
                _duration(w.uptime_seconds),
                iso(w.started_at),
                f"{w.heartbeat_age_seconds:.1f}s ago",
            ]
            for w in found
        ],
    )
    busy = [(w, b) for w in found for b in w.busy]
    if busy:
        click.echo("")
        echo_table(
            ["WORKER", "THREAD", "ACTOR", "QUEUE", "MESSAGE", "RUNNING", "STARTED", "ARGS"],
            [
                [
                    w.id[:12],
                    b.thread,
                    b.actor,
                    b.queue,
                    b.message_id,
                    _duration(b.running_seconds),
                    iso(b.started_at),
                    b.args_summary,
                ]
                for w, b in busy
            ],
        )


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}MiB"


def _duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``, ``3d04h``."""
    s = int(seconds)
    if s < 60:
        return f"{seconds:.0f}s" if seconds >= 1 else f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _delayed_split(inspector: Any) -> tuple[int | None, int | None]:
    """(retrying, scheduled) among the delayed messages: a retry carries ``retries`` > 0, a
    message sent with a delay does not. Redis only (RabbitMQ gives counts alone: ``None``)."""
    from dramatiq.common import dq_name
    from dramatiq.errors import DecodeError
    from dramatiq.message import Message

    from workers.queue_admin import RedisQueueInspector

    if not isinstance(inspector, RedisQueueInspector):
        return None, None
    retrying = scheduled = 0
    for queue in inspector.queues:
        for _, raw in inspector.client.hscan_iter(inspector.key(f"{dq_name(queue)}.msgs")):
            try:
                retried = int(Message.decode(raw).options.get("retries") or 0) > 0
            except (DecodeError, TypeError, ValueError):
                retried = False
            if retried:
                retrying += 1
            else:
                scheduled += 1
    return retrying, scheduled


def collect_stats(settings: Settings, inspector: Any) -> dict[str, Any]:
    """The totals of ``taskmanager stats`` (see its help)."""
    from cli.queues import _backend_call

    queues = _backend_call(inspector.stats)
    live = _registry(settings) if settings.redis_url else []
    retrying, scheduled = _backend_call(_delayed_split, inspector)
    ages = [q.oldest_age_seconds for q in queues if q.oldest_age_seconds is not None]
    return {
        "at": iso(_now(), timespec="milliseconds"),
        "processed": sum(w.processed for w in live),
        "failed": sum(w.failed for w in live),
        "busy": sum(w.in_flight for w in live),
        "enqueued": sum(q.ready for q in queues),
        "retrying": retrying,
        "scheduled": scheduled,
        "delayed": sum(q.delayed for q in queues),
        "dead": sum(q.dead for q in queues),
        "workers": len(live),
        "threads": sum(w.threads for w in live),
        "oldest_age_seconds": max(ages) if ages else None,
    }


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


@click.command()
@click.option(
    "--json", "as_json", is_flag=True, help="Print JSON (one object a line with --watch)."
)
@click.option(
    "--watch",
    type=click.FloatRange(min=0.05),
    default=None,
    metavar="SECONDS",
    help="Print again every SECONDS until interrupted (or --count times).",
)
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=None,
    help="With --watch: stop after this many prints.",
)
@click.option(
    "--history",
    type=click.Choice(["1h", "24h"]),
    is_flag=False,
    flag_value="1h",
    default=None,
    help="Instead: per queue, processed and failed over the last hour (by minute) or day (by "
    "10 minutes), with a sparkline; --history alone is 1h.",
)
def stats(as_json: bool, watch: float | None, count: int | None, history: str | None) -> None:
    """Totals over the platform: processed and failed (messages run and failed attempts, by the
    live worker processes since each started), busy (running now), enqueued (ready), retrying
    and scheduled (delayed: retries waiting for their backoff, messages sent with a delay),
    dead (dead-lettered), plus live workers and the oldest waiting message's age.

    With --history: the history the workers keep in Redis (24 h): per queue, attempts
    processed (succeeded or failed) and failed, and a sparkline of processed."""
    if history is not None:
        if watch is not None:
            raise click.UsageError("--history and --watch do not go together")
        _echo_history(_read_history(_worker_settings(), history), as_json=as_json)
        return
    from workers.broker import build_broker

    settings = broker_settings()
    platform = build_broker(Connections(settings))
    inspector = platform.inspector
    done = 0
    try:
        while True:
            totals = collect_stats(settings, inspector)
            if as_json:
                echo_json(totals, indent=None if watch is not None else 2)
            else:
                _echo_totals(totals, header=watch is not None)
            done += 1
            if watch is None or (count is not None and done >= count):
                return
            time.sleep(watch)
    except KeyboardInterrupt:
        return
    finally:
        platform.close()


def _echo_totals(totals: dict[str, Any], *, header: bool) -> None:
    if header:
        click.echo(f"-- {totals['at']}")
    age = totals["oldest_age_seconds"]
    for name in ("processed", "failed", "busy", "enqueued", "retrying", "scheduled", "dead"):
        value = totals[name]
        click.echo(f"{name:<10} {'-' if value is None else value}")
    click.echo(f"{'workers':<10} {totals['workers']} ({totals['threads']} threads)")
    click.echo(f"{'oldest':<10} {'-' if age is None else f'{age:.1f}s'}")


# -- stats --history -------------------------------------------------------------------------

#: Sparkline levels, lowest first (a zero is the lowest; any count at least the second).
BARS = "▁▂▃▄▅▆▇█"
#: At most this many characters of sparkline (24 h: 144 points, 3 to a character).
SPARK_WIDTH = 60


def _read_history(settings: Settings, window: str) -> Any:
    import asyncio

    from cli.common import service_errors
    from core.history import Window, read_history

    async def go() -> Any:
        client = Connections(settings).redis()
        try:
            return await read_history(client, settings.redis_prefix, cast(Window, window))
        finally:
            await client.aclose()

    with service_errors():
        return asyncio.run(go())


def sparkline(values: list[int], width: int = SPARK_WIDTH) -> str:
    """``values`` as block characters, summed in groups so the line is at most ``width``."""
    group = max(1, -(-len(values) // width))
    sums = [sum(values[i : i + group]) for i in range(0, len(values), group)]
    top = max(sums, default=0)
    if top == 0:
        return BARS[0] * len(sums)
    levels = len(BARS) - 1
    return "".join(BARS[0] if v == 0 else BARS[max(1, -(-v * levels // top))] for v in sums)


def _echo_history(found: Any, *, as_json: bool) -> None:
    if as_json:
        echo_json(found.model_dump())
        return
    click.echo(
        f"{found.window} from {iso(found.since)} to {iso(found.until)} "
        f"(one point per {found.step_seconds} s)"
    )
    if not found.queues:
        click.echo("no messages processed in this window")
        return
    rows = []
    for queue, series in found.queues.items():
        processed, failed = sum(series.processed), sum(series.failed)
        rate = f"{100 * failed / processed:.1f}%" if processed else "-"
        rows.append([queue, str(processed), str(failed), rate, sparkline(series.processed)])
    echo_table(["QUEUE", "PROCESSED", "FAILED", "FAILED%", "PROCESSED OVER TIME"], rows)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def health(as_json: bool) -> None:
    """The platform's health, check by check (as GET /api/v1/admin/health): every queue
    against its latency objective (QUEUE_LATENCY_OBJECTIVES), live workers, dead letters, the
    outbox, the scheduler's leader and the archiver's lag.

    Exit status: 0 when ok, 1 when degraded or failing (an unreachable service is a failing
    check)."""
    from core.context import open_context
    from workers.broker import build_broker
    from workers.health import health_summary

    settings = load_settings(read_only=True)
    connections = Connections(settings)
    platform = build_broker(connections)

    async def go() -> Any:
        async with open_context(settings, connections) as ctx:
            return await health_summary(ctx, platform.inspector)

    try:
        summary = run_async(go)
    finally:
        platform.close()
    if as_json:
        echo_json(summary.model_dump())
    else:
        echo_table(
            ["CHECK", "STATUS", "DETAIL"],
            [[name, c.status, c.detail] for name, c in summary.checks.items()],
        )
        click.echo(f"status: {summary.status}")
    if summary.status != "ok":
        sys.exit(1)
