"""The overview commands: ``taskmanager workers`` (each live worker process) and
``taskmanager stats`` (platform totals, optionally repeated with ``--watch``), in the manner
of ``rq info`` and ``sidekiqmon``. Both only read, so they need no ``JWT_SECRET``."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import click

from cli.common import broker_settings, echo_json, echo_table, iso
from config.connections import Connections
from config.settings import Settings


def _registry(settings: Settings) -> list[Any]:
    from workers.queue_admin import BACKEND_ERRORS
    from workers.registry import list_workers

    client = Connections(settings).redis_sync()
    try:
        return list_workers(client, settings.redis_prefix)
    except BACKEND_ERRORS as exc:
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
    """Live worker processes: host, pid, state, queues, threads, busy (running now),
    processed and failed (since the process started), started and last beat (UTC)."""
    found = _registry(_worker_settings())
    if as_json:
        echo_json([dataclasses.asdict(w) for w in found])
        return
    if not found:
        click.echo("no live workers")
        return
    echo_table(
        ["ID", "HOST", "PID", "STATE", "THREADS", "BUSY", "PROCESSED", "FAILED", "STARTED", "BEAT"],
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
                iso(w.started_at),
                f"{w.heartbeat_age_seconds:.1f}s ago",
            ]
            for w in found
        ],
    )


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
def stats(as_json: bool, watch: float | None, count: int | None) -> None:
    """Totals over the platform: processed and failed (messages run and failed attempts, by the
    live worker processes since each started), busy (running now), enqueued (ready), retrying
    and scheduled (delayed: retries waiting for their backoff, messages sent with a delay),
    dead (dead-lettered), plus live workers and the oldest waiting message's age."""
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
