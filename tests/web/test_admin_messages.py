"""Operator endpoints for one message at a time and for pausing queues, over the app's real
Redis broker with an in-process worker: browse, find, retry now, delete, dead-letter detail and
filters, pause and resume (API, queue list, metrics), and their problems."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tests.conftest import bearer, eventually, register
from tests.web.conftest import ADMIN
from tests.web.test_admin_queues import QUEUES
from web.app import create_app
from web.keys import PLATFORM

MESSAGES = "/api/v1/admin/messages"


async def get_json(client: Any, path: str, auth: dict[str, str], **params: str) -> Any:
    resp = await client.get(path, params=params, headers=auth)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def problem(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/problem+json"
    body: dict[str, Any] = await resp.json()
    return body


async def test_new_routes_need_the_admin_role(setup: Any) -> None:
    _, client, _ = setup
    user = await register(client)
    paths = [
        ("GET", f"{QUEUES}/notifications/messages"),
        ("POST", f"{QUEUES}/notifications/messages/x/retry"),
        ("DELETE", f"{QUEUES}/notifications/messages/x"),
        ("GET", f"{QUEUES}/notifications/dead/x"),
        ("DELETE", f"{QUEUES}/notifications/dead/x"),
        ("GET", f"{MESSAGES}/x"),
        ("POST", f"{QUEUES}/notifications/pause"),
        ("POST", f"{QUEUES}/notifications/resume"),
    ]
    for method, path in paths:
        resp = await client.request(method, path)
        assert resp.status == 401, path
        resp = await client.request(method, path, headers=bearer(user["access_token"]))
        await problem(resp, 403)


async def test_browse_find_retry_now_and_delete(setup: Any) -> None:
    app, client, auth = setup
    actor = app[PLATFORM].actors["send_welcome_email"]
    queue = actor.queue_name
    # The admin created at start-up was welcomed: that message is first in line.
    await eventually(
        lambda: _count(client, auth, queue, "ready", 1), what="the admin's welcome message"
    )
    sent = [await asyncio.to_thread(actor.send, {"user_id": f"u{i}"}) for i in range(3)]
    later = await asyncio.to_thread(
        actor.send_with_options, args=({"user_id": "later"},), delay=60_000
    )

    page = await get_json(client, f"{QUEUES}/{queue}/messages", auth, limit="2")
    assert len(page["items"]) == 2
    assert page["next_cursor"]
    rest = await get_json(
        client, f"{QUEUES}/{queue}/messages", auth, limit="2", cursor=page["next_cursor"]
    )
    items = page["items"] + rest["items"]
    assert [i["user_id"] for i in items[1:]] == ["u0", "u1", "u2"]
    assert rest["next_cursor"] is None
    first = items[1]
    assert set(first) == {
        "id",
        "message_id",
        "queue",
        "actor",
        "state",
        "enqueued_at",
        "eta",
        "retries",
        "args_summary",
        "user_id",
    }
    assert (first["state"], first["actor"], first["eta"]) == ("ready", actor.actor_name, None)
    assert first["message_id"] == sent[0].message_id
    assert first["enqueued_at"].endswith("Z")

    delayed = await get_json(client, f"{QUEUES}/{queue}/messages", auth, state="delayed")
    [held] = delayed["items"]
    assert (held["message_id"], held["state"]) == (later.message_id, "delayed")
    assert held["eta"].endswith("Z")

    # Find by either id.
    detail = await get_json(client, f"{MESSAGES}/{later.message_id}", auth)
    assert (detail["id"], detail["state"], detail["queue"]) == (held["id"], "delayed", queue)
    assert detail["args"] == [{"user_id": "later"}]
    assert (await get_json(client, f"{MESSAGES}/{first['id']}", auth))["state"] == "ready"

    # Retry the delayed one now: at the head of the ready list.
    resp = await client.post(f"{QUEUES}/{queue}/messages/{held['id']}/retry", headers=auth)
    assert resp.status == 200, await resp.text()
    moved = await resp.json()
    assert moved["state"] == "ready"
    assert moved["id"] != held["id"]
    page = await get_json(client, f"{QUEUES}/{queue}/messages", auth)
    assert page["items"][0]["id"] == moved["id"]
    assert page["items"][0]["eta"] is None
    delayed = await get_json(client, f"{QUEUES}/{queue}/messages", auth, state="delayed")
    assert delayed["items"] == []

    # Delete one ready message.
    resp = await client.delete(f"{QUEUES}/{queue}/messages/{first['id']}", headers=auth)
    assert resp.status == 204
    await problem(
        await client.delete(f"{QUEUES}/{queue}/messages/{first['id']}", headers=auth), 404
    )
    await problem(await client.get(f"{MESSAGES}/{first['id']}", headers=auth), 404)
    page = await get_json(client, f"{QUEUES}/{queue}/messages", auth)
    assert first["id"] not in {i["id"] for i in page["items"]}
    assert len(page["items"]) == 4  # the moved one, the welcome, u1, u2

    # Problems: unknown queue or id (404), bad parameters (422).
    await problem(await client.get(f"{QUEUES}/nope/messages", headers=auth), 404)
    await problem(await client.get(f"{MESSAGES}/no-such-message", headers=auth), 404)
    await problem(await client.post(f"{QUEUES}/{queue}/messages/nope/retry", headers=auth), 404)
    await problem(await client.post(f"{QUEUES}/nope/messages/x/retry", headers=auth), 404)
    for params in ({"state": "dead"}, {"limit": "0"}, {"cursor": "@@"}, {"other": "1"}):
        resp = await client.get(f"{QUEUES}/{queue}/messages", params=params, headers=auth)
        await problem(resp, 422)


async def _count(client: Any, auth: dict[str, str], queue: str, field: str, n: int) -> bool:
    body = await get_json(client, QUEUES, auth)
    [row] = [q for q in body["items"] if q["queue"] == queue]
    return bool(row[field] == n)


async def test_dead_letter_filters_detail_retry_and_delete(setup: Any, worker_for: Any) -> None:
    app, client, auth = setup
    actor = app[PLATFORM].actors["send_welcome_email"]
    queue = actor.queue_name
    for i in range(3):
        await asyncio.to_thread(actor.send, {"id": f"e{i}"})  # not events: die at once
    worker_for(app)
    await eventually(lambda: _count(client, auth, queue, "dead", 3), what="three dead letters")

    dead = f"{QUEUES}/{queue}/dead"
    both = await get_json(
        client, dead, auth, actor="send_welcome_email", error="unknowneventtype", limit="2"
    )
    assert len(both["items"]) == 2
    rest = await get_json(
        client,
        dead,
        auth,
        actor="send_welcome_email",
        error="unknowneventtype",
        limit="2",
        cursor=both["next_cursor"],
    )
    assert len(rest["items"]) == 1
    assert (await get_json(client, dead, auth, actor="other"))["items"] == []
    assert (await get_json(client, dead, auth, error="no such error"))["items"] == []
    await problem(await client.get(dead, params={"actor": ""}, headers=auth), 422)

    one = both["items"][0]
    detail = await get_json(client, f"{dead}/{one['id']}", auth)
    assert (detail["state"], detail["id"], detail["actor"]) == ("dead", one["id"], actor.actor_name)
    assert detail["failed_at"].endswith("Z")
    lines = detail["traceback"].splitlines()
    assert lines[0].endswith("UnknownEventType: None is not an event type")
    assert lines.index("Our frames (most recent call last):") < lines.index(
        "Other frames (Dramatiq, libraries):"
    )
    assert (await get_json(client, f"{MESSAGES}/{one['id']}", auth))["state"] == "dead"

    resp = await client.delete(f"{dead}/{one['id']}", headers=auth)
    assert resp.status == 204
    await problem(await client.get(f"{dead}/{one['id']}", headers=auth), 404)
    await problem(await client.delete(f"{dead}/{one['id']}", headers=auth), 404)

    # Retry one now (a replay): it runs again and, still broken, dies again under a new id.
    two = both["items"][1]
    resp = await client.post(f"{QUEUES}/{queue}/messages/{two['id']}/retry", headers=auth)
    assert resp.status == 200, await resp.text()
    new_id = (await resp.json())["id"]
    assert new_id != two["id"]

    async def died_again() -> bool:
        body = await get_json(client, dead, auth)
        return new_id in {i["id"] for i in body["items"]}

    await eventually(died_again, what="the replayed message dead again")
    assert len((await get_json(client, dead, auth))["items"]) == 2


async def test_pause_and_resume(setup: Any, worker_for: Any) -> None:
    app, client, auth = setup
    actor = app[PLATFORM].actors["send_welcome_email"]
    queue = actor.queue_name
    resp = await client.post(f"{QUEUES}/{queue}/pause", headers=auth)
    assert resp.status == 200
    assert await resp.json() == {"queue": queue, "paused": True, "changed": True}
    resp = await client.post(f"{QUEUES}/{queue}/pause", headers=auth)
    assert (await resp.json())["changed"] is False
    assert await _count(client, auth, queue, "paused", True)
    assert await _count(client, auth, "webhooks", "paused", False)
    text = await (await client.get("/metrics")).text()
    assert f'taskmanager_queue_paused{{queue="{queue}"}} 1.0' in text
    assert 'taskmanager_queue_paused{queue="webhooks"} 0.0' in text

    # A worker started now takes none of its messages (the admin's welcome among them).
    await asyncio.to_thread(actor.send, {"id": "held"})
    worker_for(app)
    await asyncio.sleep(2.0)
    assert await _count(client, auth, queue, "ready", 2)
    assert await _count(client, auth, queue, "dead", 0)

    started = time.monotonic()
    resp = await client.post(f"{QUEUES}/{queue}/resume", headers=auth)
    assert await resp.json() == {"queue": queue, "paused": False, "changed": True}
    await eventually(lambda: _count(client, auth, queue, "ready", 0), what="the queue drained")
    assert time.monotonic() - started < 5
    assert await _count(client, auth, queue, "paused", False)

    await problem(await client.post(f"{QUEUES}/nope/pause", headers=auth), 404)
    await problem(await client.post(f"{QUEUES}/nope/resume", headers=auth), 404)


async def test_rabbitmq_answers_501_for_waiting_messages(
    make_settings: Any, rabbitmq_url: str, aiohttp_client: Any
) -> None:
    settings = make_settings(
        admin_email=ADMIN["email"], admin_password=ADMIN["password"], broker_url=rabbitmq_url
    )
    app = create_app(settings)
    client = await aiohttp_client(app)
    resp = await client.post("/api/v1/auth/login", json=ADMIN)
    auth = bearer((await resp.json())["access_token"])
    queue = app[PLATFORM].actors["send_welcome_email"].queue_name
    for method, path in (
        ("GET", f"{QUEUES}/{queue}/messages"),
        ("POST", f"{QUEUES}/{queue}/messages/x/retry"),
        ("DELETE", f"{QUEUES}/{queue}/messages/x"),
    ):
        body = await problem(await client.request(method, path, headers=auth), 501)
        assert "RabbitMQ" in body["detail"] or "rabbitmq" in body["detail"], body
    # Dead letters one by one work there: an unknown one is 404; pausing works.
    await problem(await client.get(f"{QUEUES}/{queue}/dead/x", headers=auth), 404)
    await problem(await client.get(f"{MESSAGES}/x", headers=auth), 404)
    resp = await client.post(f"{QUEUES}/{queue}/pause", headers=auth)
    assert (await resp.json())["paused"] is True
    assert await _count(client, auth, queue, "paused", True)
