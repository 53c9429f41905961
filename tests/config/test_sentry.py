"""Sentry: events really leave the process, to a local receiver standing in for sentry.io.

The DSN points at an aiohttp server on loopback that records every envelope. Sentry's
transport sends from a background thread; ``sentry_sdk.flush`` runs on a thread too, so the
receiver (on this test's loop) can answer meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import sentry_sdk
from aiohttp import web

from cli.embedded import free_port
from config.sentry import setup_sentry
from tests.config.logs import captured_logs
from tests.conftest import register
from web.app import create_app

pytestmark = pytest.mark.timeout(90)


@dataclass
class Receiver:
    """Envelopes received, each as its list of JSON lines (headers and payloads)."""

    dsn: str
    envelopes: list[list[dict[str, Any]]] = field(default_factory=list)

    def errors(self) -> list[dict[str, Any]]:
        """Error events (those carrying an exception)."""
        return [item for env in self.envelopes for item in env if "exception" in item]

    async def wait_for_error(self, match: Any, timeout: float = 20.0) -> dict[str, Any]:
        """Flush Sentry until an error event satisfying ``match`` arrived."""
        deadline = time.monotonic() + timeout
        while True:
            await asyncio.to_thread(sentry_sdk.flush, 2.0)
            found = [e for e in self.errors() if match(e)]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching Sentry event; got {self.errors()}")
            await asyncio.sleep(0.1)


@pytest.fixture
async def receiver(aiohttp_server: Any) -> AsyncIterator[Receiver]:
    """A Sentry ingest endpoint on loopback; Sentry is switched off again afterwards."""
    received: list[list[dict[str, Any]]] = []

    async def envelope(request: web.Request) -> web.Response:
        raw = await request.read()  # aiohttp has already undone the gzip encoding
        items = []
        for line in raw.split(b"\n"):
            try:
                items.append(json.loads(line))
            except ValueError:
                continue
        received.append(items)
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/api/{project}/envelope/", envelope)
    server = await aiohttp_server(app)
    rec = Receiver(f"http://public@127.0.0.1:{server.port}/1", received)
    try:
        yield rec
    finally:
        client = sentry_sdk.get_client()
        await asyncio.to_thread(client.close, 2.0)
        sentry_sdk.get_global_scope().set_client(None)
        sentry_sdk.get_isolation_scope().remove_tag("process")


def test_no_dsn_means_no_sentry(make_settings: Any) -> None:
    assert setup_sentry(make_settings(), process="web") is False
    assert not sentry_sdk.get_client().is_active()


async def test_unhandled_handler_error_is_sent(
    receiver: Receiver, make_settings: Any, aiohttp_client: Any
) -> None:
    settings = make_settings(sentry_dsn=receiver.dsn, log_format="json")
    with captured_logs(settings, process="web"):
        assert setup_sentry(settings, process="web")
        app = create_app(settings)

        async def boom(request: web.Request) -> web.Response:
            raise RuntimeError("kaboom-7")

        app.router.add_get("/boom", boom)
        client = await aiohttp_client(app)
        resp = await client.get("/boom", headers={"X-Request-ID": "sentry-1"})
        assert resp.status == 500
        assert "kaboom" not in await resp.text()
        event = await receiver.wait_for_error(
            lambda e: e["exception"]["values"][-1]["type"] == "RuntimeError"
        )
    exc = event["exception"]["values"][-1]
    assert exc["value"] == "kaboom-7"
    assert any(f["function"] == "boom" for f in exc["stacktrace"]["frames"])
    assert event["environment"] == "test"
    # Grouped by the log event name (not a dict dump), searchable by request id.
    assert event["logentry"]["message"] == "http.unhandled_error"
    assert event["tags"]["request_id"] == "sentry-1"
    assert event["extra"]["path"] == "/boom"
    assert len(receiver.errors()) == 1


async def test_failing_actor_is_sent(
    receiver: Receiver, make_settings: Any, aiohttp_client: Any, worker_for: Any
) -> None:
    """The welcome email cannot be delivered (nothing listens on the SMTP port)."""
    settings = make_settings(sentry_dsn=receiver.dsn, smtp_url=f"smtp://127.0.0.1:{free_port()}")
    assert setup_sentry(settings, process="worker")
    app = create_app(settings)  # builds the broker after Sentry, as the processes do
    client = await aiohttp_client(app)
    worker_for(app)
    await register(client)
    event = await receiver.wait_for_error(
        lambda e: e.get("contexts", {}).get("dramatiq") is not None
    )
    exc = event["exception"]["values"][-1]
    assert exc["type"] == "SMTPConnectError", exc
    # The message body (users' data) is dropped; tags name the actor and the request.
    assert "data" not in event["contexts"]["dramatiq"]
    assert event["tags"]["actor"] == "send_welcome_email"
    assert event["tags"]["request_id"]
    assert event["user"]["id"]
