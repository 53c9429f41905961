"""The operator CLI for one message at a time and for pausing queues, against the real Redis
broker: ``queues messages|pause|resume``, ``message show|retry|delete``, ``dead
list|show|delete`` with filters, and their exit codes for unknown queues and ids."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from dramatiq import Worker

from cli.main import main
from config.connections import Connections
from config.settings import Settings
from tests.workers.test_queue_admin import wait_for
from workers.broker import Platform, build_broker


def invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture
def platform(cli_env: Settings) -> Iterator[Platform]:
    p = build_broker(Connections(cli_env))
    yield p
    p.broker.close()


def test_browse_show_retry_and_delete(platform: Platform) -> None:
    actor = platform.actors["send_welcome_email"]
    queue = actor.queue_name
    first = actor.send({"user_id": "u1"})
    actor.send({"user_id": "u2"})
    later = actor.send_with_options(args=({"user_id": "u3"},), delay=60_000)

    out = invoke("queues", "messages", queue)
    assert out.exit_code == 0, out.output
    header, *rows = out.output.splitlines()
    assert header.split()[:3] == ["#", "ID", "ACTOR"]
    assert [r.split()[0] for r in rows] == ["0", "1"]
    assert "u1" in rows[0]
    assert "u2" in rows[1]
    as_json = json.loads(invoke("queues", "messages", queue, "--state", "delayed", "--json").output)
    [held] = as_json["items"]
    assert (held["message_id"], held["state"], held["user_id"]) == (
        later.message_id,
        "delayed",
        "u3",
    )
    assert held["eta"].endswith("Z")
    assert as_json["next_cursor"] is None

    out = invoke("message", "show", first.message_id)
    assert out.exit_code == 0, out.output
    assert "state        ready" in out.output
    detail = json.loads(invoke("message", "show", later.message_id, "--json").output)
    assert (detail["state"], detail["queue"]) == ("delayed", queue)

    out = invoke("message", "retry", queue, held["id"])
    assert out.exit_code == 0, out.output
    assert f"is at the head of {queue}" in out.output
    rows = invoke("queues", "messages", queue).output.splitlines()[1:]
    assert "u3" in rows[0]

    first_id = first.options["redis_message_id"]
    out = invoke("message", "delete", queue, first_id)
    assert out.exit_code == 0, out.output
    assert f"deleted {first_id}" in out.output
    assert len(invoke("queues", "messages", queue).output.splitlines()) == 3  # header + 2

    # Unknown ids and queues exit 1 with a message.
    for args in (
        ("message", "show", first_id),
        ("message", "delete", queue, first_id),
        ("message", "retry", queue, "no-such-id"),
        ("queues", "messages", "nope"),
        ("message", "retry", "nope", "x"),
    ):
        out = invoke(*args)
        assert out.exit_code == 1, (args, out.output)
        assert "No message" in out.output or "No queue named 'nope'" in out.output, out.output
    assert invoke("queues", "messages", queue, "--state", "dead").exit_code == 2


def test_pause_and_resume_show_in_the_queue_list(platform: Platform) -> None:
    queue = platform.actors["send_welcome_email"].queue_name
    out = invoke("queues", "pause", queue)
    assert out.exit_code == 0, out.output
    assert f"{queue} paused" in out.output
    assert "already" in invoke("queues", "pause", queue).output
    [row] = [r for r in invoke("queues").output.splitlines() if r.startswith(queue)]
    assert row.startswith(f"{queue} [paused]")
    rows = json.loads(invoke("queues", "--json").output)
    assert {r["queue"]: r["paused"] for r in rows}[queue] is True
    assert platform.inspector.paused() == {queue}

    out = invoke("queues", "resume", queue)
    assert out.exit_code == 0, out.output
    assert f"{queue} resumed" in out.output
    assert "[paused]" not in invoke("queues").output
    assert invoke("queues", "pause", "nope").exit_code == 1


def test_dead_list_filters_show_and_delete(platform: Platform) -> None:
    actor = platform.actors["send_welcome_email"]
    queue = actor.queue_name
    actor.send({})  # not events: die at once
    actor.send({})
    worker = Worker(platform.broker, queues={queue}, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        wait_for(
            lambda: len(platform.inspector.dead(queue, error="UnknownEventType").items) == 2,
            what="two explained dead letters",
        )
    finally:
        worker.stop(timeout=10_000)

    out = invoke("dead", "list", queue, "--actor", "send_welcome_email", "--error", "unknownevent")
    assert out.exit_code == 0, out.output
    ids = [line.split()[0] for line in out.output.splitlines()[1:]]
    assert len(ids) == 2
    assert "no dead letters" in invoke("dead", "list", queue, "--actor", "other").output
    assert "no dead letters" in invoke("dead", "list", queue, "--error", "KeyError").output

    out = invoke("dead", "show", queue, ids[0])
    assert out.exit_code == 0, out.output
    assert "state        dead" in out.output
    tb = out.output[out.output.index("Our frames") :]
    assert tb.index("Our frames") < tb.index("Other frames")
    shown = json.loads(invoke("dead", "show", queue, ids[0], "--json").output)
    assert shown["failed_at"].endswith("Z")
    assert "UnknownEventType" in shown["error"]

    out = invoke("dead", "delete", queue, ids[0])
    assert out.exit_code == 0, out.output
    for args in (("dead", "delete", queue, ids[0]), ("dead", "show", queue, ids[0])):
        out = invoke(*args)
        assert out.exit_code == 1
        assert f"No dead letter {ids[0]!r}" in out.output
    assert len(invoke("dead", "list", queue).output.splitlines()) == 2  # header + 1
