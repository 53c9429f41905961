"""The in-app feed over HTTP, and due-soon reminders fired through the scheduled-job path:
API → outbox → Redis broker → in-process worker → MongoDB and a real SMTP sink."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import pytest

from core import jobruns, notifications
from core.notifications import NewNotification
from core.store import Doc, utcnow
from tests.conftest import SmtpSink, bearer, redeliver_welcome, register
from web.app import create_app
from web.keys import CONTEXT, PLATFORM
from workers.maintenance import enqueue_run

N = "/api/v1/notifications"


async def get_feed(client: Any, auth: dict[str, str], **params: Any) -> dict[str, Any]:
    resp = await client.get(N, params=params, headers=auth)
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def wait_for_feed(client: Any, auth: dict[str, str], count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        items: list[dict[str, Any]] = (await get_feed(client, auth))["items"]
        if len(items) >= count:
            return items
        assert time.monotonic() < deadline, f"expected {count} notifications, got {items}"
        await asyncio.sleep(0.05)


async def seed(app: Any, user_id: str, count: int) -> None:
    """Put ``count`` notifications in a user's feed, oldest first."""
    for i in range(count):
        item = NewNotification(
            user_id=user_id, key=f"seed:{i}", kind="due_soon", title=f"n{i}", body="b"
        )
        assert await notifications.create_notifications(app[CONTEXT], [item]) == 1


@pytest.fixture
async def served(make_settings: Any, aiohttp_client: Any, smtp: SmtpSink) -> tuple[Any, Any]:
    """The app, sending its emails to the ``smtp`` sink, and its test client."""
    app = create_app(make_settings(smtp_url=smtp.url))
    return app, await aiohttp_client(app)


@pytest.fixture
async def wendy(served: tuple[Any, Any], worker_for: Any) -> tuple[Any, Any, Any, Any]:
    """``served`` with its worker running, and Wendy registered: ``(app, client, her token
    pair, her Authorization header)``."""
    app, client = served
    worker_for(app)
    pair = await register(client, name="Wendy")
    return app, client, pair, bearer(pair["access_token"])


async def test_register_puts_the_welcome_in_the_feed(
    wendy: tuple[Any, Any, Any, Any], smtp: SmtpSink
) -> None:
    app, client, pair, auth = wendy
    [note] = await wait_for_feed(client, auth, 1)
    assert note["kind"] == "welcome"
    assert note["title"] == "Welcome to Task Manager"
    assert "Wendy" in note["body"]
    assert note["read_at"] is None and note["task_id"] is None
    assert set(note) == {"id", "kind", "title", "body", "task_id", "created_at", "read_at"}
    await smtp.wait_for(1)
    # A redelivered registration event adds nothing.
    await redeliver_welcome(app, pair["user"]["id"])
    # join() waits until the queue holds nothing ready, delayed or unacknowledged.
    await asyncio.to_thread(app[PLATFORM].broker.join, "notifications", timeout=10_000)
    count = (
        await app[CONTEXT].store["notifications"].count_documents({"user_id": pair["user"]["id"]})
    )
    assert count == 1
    assert len(smtp.messages) == 1


async def test_in_app_off_means_no_welcome_in_the_feed(
    served: tuple[Any, Any], smtp: SmtpSink, worker_for: Any
) -> None:
    app, client = served
    pair = await register(client)
    auth = bearer(pair["access_token"])
    resp = await client.patch(
        "/api/v1/me", json={"notification_prefs": {"in_app": False}}, headers=auth
    )
    assert resp.status == 200
    worker_for(app)
    # The actor writes the feed before it sends the email: once the email is in, it decided.
    [message] = await smtp.wait_for(1)
    assert message["To"] == pair["user"]["email"]
    assert (await get_feed(client, auth))["items"] == []


async def test_mark_read_is_idempotent_and_unread_filters(client: Any, app: Any) -> None:
    pair = await register(client)
    auth = bearer(pair["access_token"])
    await seed(app, pair["user"]["id"], 3)
    items = (await get_feed(client, auth))["items"]
    target = items[1]

    resp = await client.post(f"{N}/{target['id']}/read", headers=auth)
    assert resp.status == 200
    first = await resp.json()
    assert first["id"] == target["id"] and first["read_at"] is not None
    again = await client.post(f"{N}/{target['id']}/read", headers=auth)
    assert again.status == 200
    assert (await again.json())["read_at"] == first["read_at"]

    unread = (await get_feed(client, auth, unread="true"))["items"]
    assert [n["id"] for n in unread] == [items[0]["id"], items[2]["id"]]
    read = (await get_feed(client, auth, unread="false"))["items"]
    assert [n["id"] for n in read] == [target["id"]]
    everything = (await get_feed(client, auth))["items"]
    assert [n["id"] for n in everything] == [n["id"] for n in items]
    assert everything[1]["read_at"] == first["read_at"]


async def test_pages_newest_first_without_gaps_or_repeats(client: Any, app: Any) -> None:
    pair = await register(client)
    auth = bearer(pair["access_token"])
    await seed(app, pair["user"]["id"], 7)
    titles: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = await get_feed(client, auth, **params)
        titles += [n["title"] for n in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert titles == [f"n{i}" for i in reversed(range(7))]
    assert pages == 3
    default = await get_feed(client, auth)
    assert len(default["items"]) == 7 and default["next_cursor"] is None


async def test_a_cursor_continues_under_the_unread_filter(client: Any, app: Any) -> None:
    pair = await register(client)
    auth = bearer(pair["access_token"])
    await seed(app, pair["user"]["id"], 3)
    items = (await get_feed(client, auth))["items"]
    await client.post(f"{N}/{items[2]['id']}/read", headers=auth)
    first = await get_feed(client, auth, limit=1)
    assert [n["id"] for n in first["items"]] == [items[0]["id"]]
    rest = await get_feed(client, auth, cursor=first["next_cursor"], unread="true")
    assert [n["id"] for n in rest["items"]] == [items[1]["id"]]
    assert rest["next_cursor"] is None


async def test_another_users_notification_is_not_found(client: Any, app: Any) -> None:
    ann = await register(client)
    bob = await register(client)
    await seed(app, ann["user"]["id"], 1)
    [note] = (await get_feed(client, bearer(ann["access_token"])))["items"]
    resp = await client.post(f"{N}/{note['id']}/read", headers=bearer(bob["access_token"]))
    assert resp.status == 404
    assert resp.content_type == "application/problem+json"
    assert (await get_feed(client, bearer(bob["access_token"])))["items"] == []
    [still] = (await get_feed(client, bearer(ann["access_token"])))["items"]
    assert still["read_at"] is None
    for bad in ("nope", "0" * 24):
        resp = await client.post(f"{N}/{bad}/read", headers=bearer(ann["access_token"]))
        assert resp.status == 404


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "201"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"unread": "maybe"}, "unread"),
        ({"cursor": "garbage"}, "cursor"),
        ({"colour": "red"}, "colour"),
    ],
)
async def test_bad_parameters_are_422(client: Any, params: dict[str, str], field: str) -> None:
    pair = await register(client)
    resp = await client.get(N, params=params, headers=bearer(pair["access_token"]))
    assert resp.status == 422
    problem = await resp.json()
    assert field in [e["field"] for e in problem["errors"]], problem


async def test_the_feed_needs_a_token(client: Any) -> None:
    assert (await client.get(N)).status == 401
    assert (await client.post(f"{N}/{'0' * 24}/read")).status == 401


async def test_scheduled_job_sends_due_soon_reminders(
    wendy: tuple[Any, Any, Any, Any], smtp: SmtpSink
) -> None:
    app, client, pair, auth = wendy
    await smtp.wait_for(1)  # the welcome
    due = (utcnow() + timedelta(hours=2)).isoformat().replace("+00:00", "Z")
    resp = await client.post(
        "/api/v1/tasks", json={"title": "File taxes", "due_at": due}, headers=auth
    )
    assert resp.status == 201
    task_id = (await resp.json())["id"]

    ctx = app[CONTEXT]
    key = await enqueue_run(
        ctx, app[PLATFORM].broker, "due-soon-reminders", "send_due_soon_reminders"
    )
    messages = await smtp.wait_for(2)
    [reminder] = [m for m in messages if m["Subject"] == "Due soon: File taxes"]
    assert reminder["To"] == pair["user"]["email"]
    assert "Hello Wendy" in reminder.get_payload()

    run = await _wait_for_run(ctx, key)
    assert run["status"] == "succeeded", run
    assert run["result"] == {"reminders": 1}
    latest = await jobruns.latest(ctx, "due-soon-reminders")
    assert latest is not None and latest["_id"] == key

    notes = await wait_for_feed(client, auth, 2)
    assert [(n["kind"], n["task_id"]) for n in notes] == [
        ("due_soon", task_id),
        ("welcome", None),
    ]

    # A second fire finds nothing new.
    again = await enqueue_run(
        ctx, app[PLATFORM].broker, "due-soon-reminders", "send_due_soon_reminders"
    )
    assert (await _wait_for_run(ctx, again))["result"] == {"reminders": 0}
    assert len(smtp.messages) == 2


async def _wait_for_run(ctx: Any, key: str) -> Doc:
    deadline = time.monotonic() + 15
    while True:
        run = await ctx.store["job_runs"].find_one({"_id": key})
        if run is not None and run["status"] in ("succeeded", "failed"):
            return dict(run)
        assert time.monotonic() < deadline, f"run {key} did not finish: {run}"
        await asyncio.sleep(0.05)
