"""API → outbox → relay → broker (Redis and RabbitMQ, both real) → worker → real SMTP."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import SmtpSink, redeliver_welcome, register
from web.app import create_app
from web.keys import CONTEXT


@pytest.fixture
async def running(
    broker_settings: Any, aiohttp_client: Any, smtp: SmtpSink, worker_for: Any
) -> tuple[Any, Any]:
    """The app (over each broker), mailing the ``smtp`` sink, its worker running; and its
    test client."""
    app = create_app(broker_settings(smtp_url=smtp.url))
    client = await aiohttp_client(app)
    worker_for(app)
    return app, client


async def test_register_sends_one_welcome_email(running: tuple[Any, Any], smtp: SmtpSink) -> None:
    app, client = running
    pair = await register(client, "welcome@example.com", name="Wendy")
    [message] = await smtp.wait_for(1)
    assert message["To"] == "welcome@example.com"
    assert message["Subject"] == "Welcome to Task Manager"
    assert "Hello Wendy" in message.get_payload()
    # The event left the outbox.
    event = await app[CONTEXT].store["events"].find_one({"user_id": pair["user"]["id"]})
    assert event is not None
    assert "pending" not in event
    assert event["dispatched_at"]


async def test_welcome_actor_is_idempotent(running: tuple[Any, Any], smtp: SmtpSink) -> None:
    app, client = running
    pair = await register(client)
    await smtp.wait_for(1)
    # Redeliver the same event twice, as an at-least-once broker may.
    await redeliver_welcome(app, pair["user"]["id"])
    await asyncio.sleep(1.5)
    assert len(smtp.messages) == 1


async def test_welcome_respects_preferences(
    broker_settings: Any, aiohttp_client: Any, smtp: SmtpSink, worker_for: Any
) -> None:
    """A user who opted out before the worker ran gets nothing."""
    app = create_app(broker_settings(smtp_url=smtp.url))
    client = await aiohttp_client(app)
    pair = await register(client)
    await (
        app[CONTEXT]
        .store["users"]
        .update_one(
            {"email": pair["user"]["email"]}, {"$set": {"notification_prefs.email_welcome": False}}
        )
    )
    worker_for(app)
    other = await register(client)
    messages = await smtp.wait_for(1)
    await asyncio.sleep(0.5)
    assert [m["To"] for m in messages] == [other["user"]["email"]]
