"""Request ids: on every log line of a request, echoed to the client, carried through the
outbox into the worker's log lines for the resulting message."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.config.logs import JsonLines, captured_logs
from tests.conftest import SmtpSink, register
from web.app import create_app
from web.keys import CONTEXT

GENERATED = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture
def json_logs(make_settings: Any) -> Iterator[JsonLines]:
    """JSON logging as ``LOG_FORMAT=json`` configures it, captured, restored afterwards."""
    with captured_logs(make_settings(log_format="json"), process="test") as lines:
        yield lines


def _with_id(lines: JsonLines, request_id: str) -> dict[str, dict[str, Any]]:
    return {line["event"]: line for line in lines() if line.get("request_id") == request_id}


async def test_request_id_on_access_and_core_lines(
    json_logs: JsonLines, make_settings: Any, aiohttp_client: Any
) -> None:
    app = create_app(make_settings(log_format="json"))
    client = await aiohttp_client(app)
    ids = ("abc-123", "def-456")
    users = []
    for request_id in ids:
        resp = await client.post(
            "/api/v1/auth/register",
            json={"email": f"{request_id}@example.com", "password": "correct horse 1", "name": "A"},
            headers={"X-Request-ID": request_id},
        )
        assert resp.status == 201
        assert resp.headers["X-Request-ID"] == request_id
        users.append((await resp.json())["user"]["id"])

    for request_id, user_id in zip(ids, users, strict=True):
        lines = _with_id(json_logs, request_id)
        access = lines["http.request"]
        assert access["path"] == "/api/v1/auth/register"
        assert access["method"] == "POST"
        assert access["status"] == 201
        assert access["process"] == "test"
        # A line logged deep inside core code, during that request, carries its id too.
        assert lines["user.registered"]["user_id"] == user_id
        # ... and the id travels with the event recorded in the outbox.
        event = await app[CONTEXT].store["events"].find_one({"user_id": user_id})
        assert event is not None
        assert event["request_id"] == request_id


@pytest.mark.parametrize(
    "incoming",
    ["has spaces", "x" * 500, "a" * 129, "<script>", "id\twith\ttabs", ""],
    ids=["spaces", "500-chars", "129-chars", "markup", "tabs", "empty"],
)
async def test_invalid_request_id_is_replaced(
    json_logs: JsonLines, client: Any, incoming: str
) -> None:
    resp = await client.get("/api/v1/me", headers={"X-Request-ID": incoming})
    assert resp.status == 401
    generated = resp.headers["X-Request-ID"]
    assert generated != incoming
    assert GENERATED.match(generated)
    # The problem body quotes the same id the client sees and the log line carries.
    assert (await resp.json())["request_id"] == generated
    access = _with_id(json_logs, generated)["http.request"]
    assert access["status"] == 401
    assert access["path"] == "/api/v1/me"


async def test_sane_request_id_is_kept_up_to_128_chars(client: Any) -> None:
    incoming = "A1._:-" + "z" * 122
    assert len(incoming) == 128
    resp = await client.get("/readyz", headers={"X-Request-ID": incoming})
    assert resp.headers["X-Request-ID"] == incoming


async def test_missing_request_id_is_generated(client: Any) -> None:
    first = await client.get("/healthz")
    second = await client.get("/healthz")
    assert GENERATED.match(first.headers["X-Request-ID"])
    assert first.headers["X-Request-ID"] != second.headers["X-Request-ID"]


async def test_request_id_reaches_the_worker_log_lines(
    json_logs: JsonLines,
    make_settings: Any,
    aiohttp_client: Any,
    smtp: SmtpSink,
    worker_for: Any,
) -> None:
    app = create_app(make_settings(log_format="json", smtp_url=smtp.url))
    client = await aiohttp_client(app)
    worker_for(app)
    resp = await client.post(
        "/api/v1/auth/register",
        json={"email": "flow@example.com", "password": "correct horse 1", "name": "Flo"},
        headers={"X-Request-ID": "flow-42"},
    )
    assert resp.status == 201
    user_id = (await resp.json())["user"]["id"]
    await smtp.wait_for(1)
    deadline = time.monotonic() + 10
    while "mail.sent" not in _with_id(json_logs, "flow-42"):
        assert time.monotonic() < deadline, "no mail.sent line with the request id"
        await asyncio.sleep(0.05)
    sent = _with_id(json_logs, "flow-42")["mail.sent"]
    event = await app[CONTEXT].store["events"].find_one({"user_id": user_id})
    assert event is not None
    # event_id is bound by the actor (workers/actors.py): this line came from the worker.
    assert sent["event_id"] == str(event["_id"])
    assert sent["user_id"] == user_id
    assert sent["logger"] == "core.notifications"


async def test_request_without_id_does_not_inherit_the_previous_one(
    json_logs: JsonLines, client: Any
) -> None:
    await client.get("/readyz", headers={"X-Request-ID": "first-1"})
    await register(client)
    [registered] = [line for line in json_logs() if line["event"] == "user.registered"]
    assert GENERATED.match(registered["request_id"])
