"""Operator commands answer bad input with a message, not a traceback (issue 7): malformed or
unreachable ``MONGODB_URL``/``REDIS_URL``, an unknown worker queue, a ``RATE_LIMIT`` the
limiter cannot honour; and ``schedules`` shows the scheduler's stored next run."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from click.testing import CliRunner, Result

from cli.embedded import free_port
from cli.main import main


async def invoke(*args: str) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, main, list(args))


def no_traceback(result: Result) -> None:
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MONGODB_URL", "localhost:27017"),
        ("MONGODB_URL", "mongodb://"),
        ("MONGODB_URL", "mongodb://db:port"),
        ("REDIS_URL", "http://127.0.0.1:6379"),
        ("REDIS_URL", "redis://:6379/0"),
        ("BROKER_URL", "amqp:/nohost"),
    ],
)
async def test_malformed_url_names_the_variable(
    cli_env: Any,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
) -> None:
    monkeypatch.setenv(variable, value)
    for command in (["schedules"], ["admin", "revoke-sessions", "--email", "a@example.com"]):
        result = await invoke(*command)
        assert result.exit_code == 1, result.output
        assert f"{variable}:" in result.output, result.output
        no_traceback(result)


@pytest.mark.parametrize(
    ("variable", "url", "command", "message"),
    [
        (
            "MONGODB_URL",
            "mongodb://127.0.0.1:{port}/?directConnection=true",
            ["admin", "create", "--email", "x@example.com", "--password", "pw 12345678"],
            "MongoDB (MONGODB_URL) is unreachable",
        ),
        (
            "REDIS_URL",
            "redis://127.0.0.1:{port}/0",
            ["schedules"],
            "Redis (REDIS_URL) is unreachable",
        ),
    ],
)
async def test_an_unreachable_store_names_the_variable(
    cli_env: Any,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    url: str,
    command: list[str],
    message: str,
) -> None:
    monkeypatch.setenv(variable, url.format(port=free_port()))
    monkeypatch.setenv("MONGODB_TIMEOUT_MS", "200")
    result = await invoke(*command)
    assert result.exit_code == 1, result.output
    assert message in result.output
    no_traceback(result)


async def test_worker_refuses_an_unknown_queue(cli_env: Any) -> None:
    result = await invoke("worker", "--queues", "webhook")
    assert result.exit_code == 2, result.output
    assert "'webhook'" in result.output and "webhooks" in result.output
    assert "notifications" in result.output  # the known queues are listed
    no_traceback(result)


@pytest.mark.parametrize("rate", ["1000001/second", "99999999999/minute"])
async def test_rate_limit_finer_than_a_microsecond_is_refused(
    cli_env: Any,
    monkeypatch: pytest.MonkeyPatch,
    rate: str,
) -> None:
    monkeypatch.setenv("RATE_LIMIT", rate)
    result = await invoke("schedules")
    assert result.exit_code == 1, result.output
    assert "RATE_LIMIT:" in result.output and "per microsecond" in result.output
    no_traceback(result)


async def test_schedules_prints_the_stored_next_run(ctx: Any, cli_env: Any) -> None:
    """The scheduler stores each job's next run as APScheduler plans it; ``schedules`` shows
    that one (an interval job's next run depends on when the scheduler started)."""
    planned = datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC)
    await ctx.store["schedules"].update_one(
        {"_id": "due-soon-reminders"},
        {"$set": {"next_run_at": planned, "trigger": "interval", "actor": "x"}},
        upsert=True,
    )
    result = await invoke("schedules")
    assert result.exit_code == 0, result.output
    [line] = [ln for ln in result.output.splitlines() if ln.startswith("due-soon-reminders")]
    assert " 2031-01-02T03:04:05Z " in line, line
    # A job no scheduler has published yet has no next run to show.
    [line] = [ln for ln in result.output.splitlines() if ln.startswith("backup ")]
    assert " - " in line, line
