"""Operator endpoints for queues, dead letters and workers, and the queue metrics, over the
app's real Redis broker with an in-process worker."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.conftest import bearer, eventually, register
from web.keys import PLATFORM

QUEUES = "/api/v1/admin/queues"


async def queue_row(client: Any, auth: dict[str, str], queue: str) -> dict[str, Any]:
    resp = await client.get(QUEUES, headers=auth)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["broker"] == "redis"
    assert set(body["outbox"]) == {"oldest_pending_age_seconds", "pending", "set_aside"}
    [row] = [q for q in body["items"] if q["queue"] == queue]
    return row  # type: ignore[no-any-return]


async def test_admin_routes_need_the_admin_role(setup: Any) -> None:
    _, client, _ = setup
    user = await register(client)
    paths = [
        ("GET", QUEUES),
        ("GET", f"{QUEUES}/notifications/dead"),
        ("POST", f"{QUEUES}/notifications/dead/retry"),
        ("DELETE", f"{QUEUES}/notifications/dead"),
        ("GET", "/api/v1/admin/workers"),
    ]
    for method, path in paths:
        kwargs: dict[str, Any] = {"json": {}} if method == "POST" else {}
        resp = await client.request(method, path, **kwargs)
        assert resp.status == 401, path
        resp = await client.request(method, path, headers=bearer(user["access_token"]), **kwargs)
        assert resp.status == 403, path
        assert resp.content_type == "application/problem+json"


async def test_queue_counts_dead_letters_and_replay(setup: Any, worker_for: Any) -> None:
    app, client, auth = setup
    actor = app[PLATFORM].actors["send_welcome_email"]
    queue = actor.queue_name

    # The admin created at start-up was welcomed: that one message is already queued.
    row = await eventually(lambda: _ready_row(client, auth, queue, 1))
    assert {k: row[k] for k in ("ready", "delayed", "in_progress", "dead")} == {
        "ready": 1,
        "delayed": 0,
        "in_progress": 0,
        "dead": 0,
    }
    await asyncio.to_thread(actor.send, {"id": "e1"})  # not an event (no type): dies at once
    await asyncio.to_thread(actor.send, {"id": "e2"})
    await asyncio.to_thread(actor.send_with_options, args=({"user_id": "later"},), delay=60_000)
    row = await queue_row(client, auth, queue)
    assert (row["ready"], row["delayed"]) == (3, 1)
    assert row["oldest_age_seconds"] >= 0

    worker_for(app)
    await eventually(lambda: _dead_count(client, auth, queue, 2))

    resp = await client.get(f"{QUEUES}/{queue}/dead?limit=1", headers=auth)
    assert resp.status == 200
    first = await resp.json()
    assert len(first["items"]) == 1
    assert first["next_cursor"]
    resp = await client.get(
        f"{QUEUES}/{queue}/dead", params={"cursor": first["next_cursor"]}, headers=auth
    )
    second = await resp.json()
    assert second["next_cursor"] is None
    items = first["items"] + second["items"]
    assert sorted(i["args"][0]["id"] for i in items) == ["e1", "e2"]
    item = items[0]
    assert item["actor"] == "send_welcome_email"
    assert item["queue"] == queue
    assert item["error"] == "UnknownEventType: None is not an event type"
    assert item["failed_at"].endswith(("Z", "+00:00"))

    # Replay one: it runs again (and, still broken, dies again under a new id).
    resp = await client.post(
        f"{QUEUES}/{queue}/dead/retry", json={"ids": [item["id"]]}, headers=auth
    )
    assert resp.status == 200
    assert await resp.json() == {"retried": 1, "not_found": []}
    resp = await client.post(
        f"{QUEUES}/{queue}/dead/retry", json={"ids": [item["id"]]}, headers=auth
    )
    assert await resp.json() == {"retried": 0, "not_found": [item["id"]]}

    async def replayed() -> bool:
        resp = await client.get(f"{QUEUES}/{queue}/dead", headers=auth)
        ids = {i["id"] for i in (await resp.json())["items"]}
        return len(ids) == 2 and item["id"] not in ids

    await eventually(replayed)

    resp = await client.get(f"{QUEUES}/{queue}/dead", params={"limit": "0"}, headers=auth)
    assert resp.status == 422
    resp = await client.get(f"{QUEUES}/{queue}/dead", params={"cursor": "@@"}, headers=auth)
    assert resp.status == 422
    resp = await client.post(f"{QUEUES}/{queue}/dead/retry", json={"ids": "x"}, headers=auth)
    assert resp.status == 422

    resp = await client.delete(f"{QUEUES}/{queue}/dead", headers=auth)
    assert resp.status == 200
    assert await resp.json() == {"purged": 2}
    row = await queue_row(client, auth, queue)
    assert row["dead"] == 0


async def _ready_row(
    client: Any, auth: dict[str, str], queue: str, count: int
) -> dict[str, Any] | None:
    row = await queue_row(client, auth, queue)
    return row if row["ready"] == count else None


async def _dead_count(client: Any, auth: dict[str, str], queue: str, count: int) -> bool:
    return (await queue_row(client, auth, queue))["dead"] == count


async def test_unknown_queue_is_404(setup: Any) -> None:
    _, client, auth = setup
    for method in ("GET", "DELETE"):
        resp = await client.request(method, f"{QUEUES}/nope/dead", headers=auth)
        assert resp.status == 404
    resp = await client.post(f"{QUEUES}/nope/dead/retry", json={}, headers=auth)
    assert resp.status == 404


async def test_workers_list(setup: Any, worker_for: Any) -> None:
    app, client, auth = setup
    resp = await client.get("/api/v1/admin/workers", headers=auth)
    assert resp.status == 200
    assert (await resp.json())["items"] == []
    worker = worker_for(app)

    async def idle() -> list[dict[str, Any]] | None:
        # The admin's welcome (and whatever else registration feeds) runs first.
        resp = await client.get("/api/v1/admin/workers", headers=auth)
        items: list[dict[str, Any]] = (await resp.json())["items"]
        return items if items and items[0]["in_flight"] == 0 else None

    [info] = await eventually(idle)
    assert info["state"] == "running"
    assert info["threads"] == worker.worker_threads
    assert info["heartbeat_age_seconds"] < 10
    assert "notifications" in info["queues"]


async def test_metrics_expose_queue_depths(app: Any, client: Any) -> None:
    actor = app[PLATFORM].actors["send_welcome_email"]
    for _ in range(3):
        await asyncio.to_thread(actor.send, {"user_id": "x"})
    resp = await client.get("/metrics")
    assert resp.status == 200
    text = await resp.text()
    queue = actor.queue_name
    assert f'taskmanager_queue_messages{{queue="{queue}",state="ready"}} 3.0' in text
    assert f'taskmanager_queue_messages{{queue="{queue}",state="dead"}} 0.0' in text
    assert f'taskmanager_queue_oldest_age_seconds{{queue="{queue}"}}' in text
    assert "taskmanager_queue_stats_up 1.0" in text
