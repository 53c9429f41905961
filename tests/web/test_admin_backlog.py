"""``GET /api/v1/admin/backlog``: the users with the most messages waiting per queue, counted
from the outbox (SecantusDB) whether still held back or sent and not finished; the admin role,
bad queries."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from core import events
from core.store import utcnow
from tests.conftest import bearer, register
from web.keys import CONTEXT

BACKLOG = "/api/v1/admin/backlog"
NAMES = ("alice", "bob")


def _created(user: str) -> dict[str, Any]:
    return events.new_event(
        events.EventType.TASK_CREATED, user_id=user, subject_id="t", data={"task": {}}
    )


async def test_backlog_counts_held_and_sent_messages_per_user(setup: Any) -> None:
    app, client, auth = setup
    ctx = app[CONTEXT]
    await events.record(ctx, [_created("alice") for _ in range(3)] + [_created("bob")], None)
    # One of alice's events was sent earlier: its search message is not finished, its cache
    # message is.
    sent = _created("alice")
    sent.pop("pending")
    due = utcnow() + timedelta(minutes=5)
    update = events.receipt(
        ["refresh_user_cache"],
        [
            events.Expected("index_task", "index_task", due),
            events.Expected("refresh_user_cache", "refresh_user_cache", due),
        ],
    )
    await ctx.store["events"].insert_one(sent)
    await ctx.store["events"].update_one({"_id": sent["_id"]}, update)

    resp = await client.get(BACKLOG, headers=auth)
    assert resp.status == 200, await resp.text()
    queues = (await resp.json())["queues"]
    # task.created feeds cache, search, webhooks and analytics. The app's relay may have sent
    # the pending events meanwhile (no worker runs them): they move from outbox to in_broker.
    search = queues["search"]
    assert [(r["user_id"], r["waiting"]) for r in search] == [("alice", 4), ("bob", 1)]
    assert all(r["outbox"] + r["in_broker"] == r["waiting"] for r in search)
    # (The admin's sign-in feeds the cache queue too.)
    cache = [(r["user_id"], r["waiting"]) for r in queues["cache"] if r["user_id"] in NAMES]
    assert cache == [("alice", 3), ("bob", 1)]
    assert {"search", "cache", "webhooks", "analytics"} <= set(queues)

    resp = await client.get(f"{BACKLOG}?queue=search&limit=1", headers=auth)
    assert (await resp.json()) == {"queues": {"search": [search[0]]}}
    resp = await client.get(f"{BACKLOG}?queue=maintenance", headers=auth)
    assert (await resp.json()) == {"queues": {}}


async def test_backlog_is_for_admins_with_a_valid_query(setup: Any) -> None:
    _, client, auth = setup
    user = await register(client, "someone@example.com")
    resp = await client.get(BACKLOG, headers=bearer(user["access_token"]))
    assert resp.status == 403
    assert (await client.get(BACKLOG)).status == 401
    for bad in ("limit=0", "limit=101", "limit=x", "other=1"):
        resp = await client.get(f"{BACKLOG}?{bad}", headers=auth)
        assert resp.status == 422, bad
