"""One message at a time, and pausing queues: ``queues messages|pause|resume``, ``message
show|retry|delete`` and ``dead show|delete`` (attached to the ``queues`` and ``dead`` groups
by :mod:`cli.main`). The work is :mod:`workers.queue_admin`; an unknown queue or id exits 1
with its message, a message a worker has taken exits 1 too (409 in the API), and what the
broker cannot do (RabbitMQ: ready and delayed messages) exits 1 saying so."""

from __future__ import annotations

import dataclasses
from typing import Any

import click

from cli.common import echo_json, echo_table, iso
from cli.queues import _backend_call, _inspector


@click.command("messages")
@click.argument("queue")
@click.option(
    "--state",
    type=click.Choice(["ready", "delayed"]),
    default="ready",
    show_default=True,
    help="ready: in the order workers take them; delayed: soonest first.",
)
@click.option("--limit", type=click.IntRange(1, 200), default=50, show_default=True)
@click.option("--cursor", default=None, help="Continue after a previous page.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def queues_messages(queue: str, state: str, limit: int, cursor: str | None, as_json: bool) -> None:
    """List QUEUE's ready (index 0 is taken next) or delayed messages."""
    page = _backend_call(_inspector().messages, queue, state, limit=limit, cursor=cursor)
    if as_json:
        echo_json(
            {"items": [dataclasses.asdict(m) for m in page.items], "next_cursor": page.next_cursor}
        )
        return
    if not page.items:
        click.echo(f"no {state} messages in {queue}")
        return
    echo_table(
        ["#", "ID", "ACTOR", "ENQUEUED AT", "ETA", "RETRIES", "USER", "ARGS"],
        [
            [
                str(index),
                m.id,
                m.actor,
                iso(m.enqueued_at),
                iso(m.eta),
                str(m.retries),
                m.user_id or "-",
                m.args_summary[:60],
            ]
            for index, m in enumerate(page.items)
        ],
    )
    if page.next_cursor:
        click.echo(f"more: --cursor {page.next_cursor}")


def _set_paused(queue: str, paused: bool) -> None:
    changed = _backend_call(_inspector().set_paused, queue, paused)
    state = "paused" if paused else "resumed"
    note = "" if changed else f" (it already was {'paused' if paused else 'running'})"
    click.echo(f"{queue} {state}{note}; workers see it within a second")


@click.command("pause")
@click.argument("queue")
def queues_pause(queue: str) -> None:
    """Pause QUEUE: workers take none of its messages until it is resumed."""
    _set_paused(queue, True)


@click.command("resume")
@click.argument("queue")
def queues_resume(queue: str) -> None:
    """Resume a paused QUEUE."""
    _set_paused(queue, False)


def echo_detail(detail: Any, as_json: bool) -> None:
    """A message's detail: JSON, or its fields then its arguments and traceback."""
    if as_json:
        echo_json(dataclasses.asdict(detail))
        return
    rows = [
        ("id", detail.id),
        ("message id", detail.message_id),
        ("queue", detail.queue),
        ("actor", detail.actor),
        ("state", detail.state),
        ("enqueued at", iso(detail.enqueued_at)),
        ("eta", iso(detail.eta)),
        ("retries", str(detail.retries)),
        ("failed at", iso(detail.failed_at)),
        ("error", detail.error or "-"),
        ("args", repr(detail.args)),
        ("kwargs", repr(detail.kwargs)),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        click.echo(f"{name.ljust(width)}  {value}")
    if detail.traceback:
        click.echo("")
        click.echo(detail.traceback)


@click.group()
def message() -> None:
    """One message, by id (the broker's, or Dramatiq's message id): show, retry, delete."""


@message.command("show")
@click.argument("message_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def message_show(message_id: str, as_json: bool) -> None:
    """Find a message in every queue and state (ready, delayed, in_progress, dead)."""
    echo_detail(_backend_call(_inspector().find, message_id), as_json)


@message.command("retry")
@click.argument("queue")
@click.argument("message_id")
def message_retry(queue: str, message_id: str) -> None:
    """Retry now: a ready or delayed message to the head of QUEUE, a dead one replayed."""
    new_id = _backend_call(_inspector().retry_message, queue, message_id)
    click.echo(f"{message_id} is at the head of {queue} (id {new_id})")


@message.command("delete")
@click.argument("queue")
@click.argument("message_id")
def message_delete(queue: str, message_id: str) -> None:
    """Delete one ready, delayed or dead message of QUEUE."""
    _backend_call(_inspector().delete_message, queue, message_id)
    click.echo(f"deleted {message_id} from {queue}")


@click.command("show")
@click.argument("queue")
@click.argument("dead_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def dead_show(queue: str, dead_id: str, as_json: bool) -> None:
    """One dead letter of QUEUE, its traceback with our frames first."""
    echo_detail(_backend_call(_inspector().dead_detail, queue, dead_id), as_json)


@click.command("delete")
@click.argument("queue")
@click.argument("dead_id")
def dead_delete(queue: str, dead_id: str) -> None:
    """Delete one dead letter of QUEUE."""
    _backend_call(_inspector().delete_dead, queue, dead_id)
    click.echo(f"deleted dead letter {dead_id} from {queue}")
