"""The webhooks API: registration rules (including SSRF), secrets shown once, ownership,
limits and pagination. No worker runs here and nothing is delivered: addresses are literals or
``localhost`` (from /etc/hosts), so no test sends traffic or DNS queries anywhere."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from bson import ObjectId

from core import webhooks
from core.events import EventType
from tests.conftest import bearer, register
from web.app import create_app
from web.keys import CONTEXT

W = "/api/v1/webhooks"
LOOP = "http://127.0.0.1:9/hook"


@pytest.fixture
async def allowing(make_settings: Any, aiohttp_client: Any) -> TestClient[Any, Any]:
    """A client of an app whose WEBHOOK_ALLOW_HOSTS lists 127.0.0.1 (as in tests)."""
    client: TestClient[Any, Any] = await aiohttp_client(
        create_app(make_settings(webhook_allow_hosts=["127.0.0.1"]))
    )
    return client


async def auth_for(client: Any) -> dict[str, str]:
    pair = await register(client)
    return bearer(pair["access_token"])


async def add(client: Any, auth: dict[str, str], url: str = LOOP, **extra: Any) -> Any:
    resp = await client.post(W, json={"url": url, "events": ["*"], **extra}, headers=auth)
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def test_secret_is_shown_once(allowing: Any) -> None:
    auth = await auth_for(allowing)
    resp = await allowing.post(
        W, json={"url": LOOP, "events": ["task.created", "task.completed"]}, headers=auth
    )
    assert resp.status == 201
    created = await resp.json()
    assert set(created) == {
        "id",
        "url",
        "events",
        "created_at",
        "state",
        "paused_reason",
        "paused_at",
        "secret",
    }
    assert (created["state"], created["paused_reason"], created["paused_at"]) == (
        "active",
        None,
        None,
    )
    assert resp.headers["Location"] == f"{W}/{created['id']}"
    assert resp.headers["Cache-Control"] == "no-store"
    assert created["events"] == ["task.created", "task.completed"]
    assert len(created["secret"]) >= 43

    listed = await (await allowing.get(W, headers=auth)).json()
    assert [set(item) for item in listed["items"]] == [
        {"id", "url", "events", "created_at", "state", "paused_reason", "paused_at"}
    ]
    one = await (await allowing.get(f"{W}/{created['id']}", headers=auth)).json()
    assert "secret" not in one
    assert one["url"] == LOOP
    # Stored sealed, never in the clear.
    stored = await allowing.app[CONTEXT].store["webhooks"].find_one({})
    assert created["secret"].encode() not in bytes(stored["secret"])
    assert created["secret"] not in str(stored)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"url": LOOP, "events": []}, "events"),
        ({"url": LOOP, "events": ["task.exploded"]}, "events.0"),
        ({"url": LOOP, "events": "task.created"}, "events"),
        ({"url": LOOP}, "events"),
        ({"events": ["*"]}, "url"),
        ({"url": LOOP, "events": ["*"], "secret": "mine"}, "secret"),
        ({"url": {"$gt": ""}, "events": ["*"]}, "url"),
        ({"url": "ftp://127.0.0.1/x", "events": ["*"]}, "url"),
        ({"url": "http://u:p@127.0.0.1/x", "events": ["*"]}, "url"),
        ({"url": "http://127.0.0.1/" + "a" * 2048, "events": ["*"]}, "url"),
    ],
)
async def test_invalid_bodies(allowing: Any, payload: dict[str, Any], field: str) -> None:
    auth = await auth_for(allowing)
    resp = await allowing.post(W, json=payload, headers=auth)
    assert resp.status == 422, await resp.text()
    problem = await resp.json()
    assert field in [e["field"] for e in problem["errors"]]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/hook",
        "http://127.0.0.1:8080/hook",
        "http://10.0.0.1/",
        "http://172.16.0.1/",
        "http://192.168.0.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[fe80::1]/",
        "http://224.0.0.1/",
        "http://0.0.0.0/",
        "http://100.64.0.1/",
        "http://localhost/",
        "https://localhost:8443/hook",
        "http://2130706433/",
    ],
)
async def test_private_targets_are_refused(client: Any, url: str) -> None:
    auth = await auth_for(client)
    resp = await client.post(W, json={"url": url, "events": ["*"]}, headers=auth)
    assert resp.status == 422, await resp.text()
    problem = await resp.json()
    assert [e["field"] for e in problem["errors"]] == ["url"]
    assert await client.app[CONTEXT].store["webhooks"].count_documents({}) == 0


async def test_allow_list_admits_only_the_listed_host(allowing: Any) -> None:
    auth = await auth_for(allowing)
    await add(allowing, auth, "http://127.0.0.1:8080/in")
    for url in ("http://localhost:8080/in", "http://10.0.0.1/", "http://[::1]/"):
        resp = await allowing.post(W, json={"url": url, "events": ["*"]}, headers=auth)
        assert resp.status == 422, url


async def test_other_users_webhooks_are_invisible(allowing: Any) -> None:
    alice, bob = await auth_for(allowing), await auth_for(allowing)
    hook = await add(allowing, alice)
    mine = await add(allowing, bob)
    base = f"{W}/{hook['id']}"
    assert (await allowing.get(base, headers=bob)).status == 404
    assert (await allowing.get(f"{base}/deliveries", headers=bob)).status == 404
    resp = await allowing.post(f"{base}/deliveries/x:y/redeliver", headers=bob)
    assert resp.status == 404
    assert (await allowing.delete(base, headers=bob)).status == 404
    listed = await (await allowing.get(W, headers=bob)).json()
    assert [h["id"] for h in listed["items"]] == [mine["id"]]
    assert (await allowing.get(base, headers=alice)).status == 200
    assert (await allowing.get(f"{W}/not-an-id", headers=alice)).status == 404


async def test_redeliver_unknown_delivery(allowing: Any) -> None:
    auth = await auth_for(allowing)
    hook = await add(allowing, auth)
    resp = await allowing.post(f"{W}/{hook['id']}/deliveries/nope/redeliver", headers=auth)
    assert resp.status == 404


async def test_delete(allowing: Any) -> None:
    auth = await auth_for(allowing)
    hook = await add(allowing, auth)
    store = allowing.app[CONTEXT].store
    await store["webhook_deliveries"].insert_one({"_id": "e:x", "webhook_id": hook["id"]})
    assert (await allowing.delete(f"{W}/{hook['id']}", headers=auth)).status == 204
    assert (await allowing.get(f"{W}/{hook['id']}", headers=auth)).status == 404
    assert (await allowing.get(f"{W}/{hook['id']}/deliveries", headers=auth)).status == 404
    assert (await allowing.delete(f"{W}/{hook['id']}", headers=auth)).status == 404
    assert await store["webhook_deliveries"].count_documents({}) == 0


async def test_per_user_limit(allowing: Any) -> None:
    auth = await auth_for(allowing)
    for i in range(webhooks.MAX_WEBHOOKS_PER_USER):
        await add(allowing, auth, f"{LOOP}/{i}")
    resp = await allowing.post(W, json={"url": LOOP, "events": ["*"]}, headers=auth)
    assert resp.status == 409
    # Another user is not affected.
    await add(allowing, await auth_for(allowing))


async def test_list_pagination(allowing: Any) -> None:
    auth = await auth_for(allowing)
    made = [(await add(allowing, auth, f"{LOOP}/{i}"))["id"] for i in range(5)]
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = await (await allowing.get(W, params=params, headers=auth)).json()
        assert len(page["items"]) <= 2
        seen += [h["id"] for h in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(made))
    resp = await allowing.get(W, params={"cursor": "forged"}, headers=auth)
    assert resp.status == 422


async def test_idempotent_registration(allowing: Any) -> None:
    auth = await auth_for(allowing)
    body = {"url": LOOP, "events": ["*"]}
    headers = {**auth, "Idempotency-Key": "hook-1"}
    first = await allowing.post(W, json=body, headers=headers)
    again = await allowing.post(W, json=body, headers=headers)
    assert (first.status, again.status) == (201, 201)
    assert (await first.json())["id"] == (await again.json())["id"]
    assert await allowing.app[CONTEXT].store["webhooks"].count_documents({}) == 1


async def seed_deliveries(app: Any, hook_id: str, count: int) -> list[str]:
    """Deliveries as the fan-out makes them (no worker runs here)."""
    ctx = app[CONTEXT]
    hook = await ctx.store["webhooks"].find_one({"_id": ObjectId(hook_id)})
    made = []
    for i in range(count):
        event = {
            "id": str(ObjectId()),
            "type": "task.created",
            "created_at": "2026-01-01T00:00:00Z",
            "data": {"n": i},
        }
        doc, fresh = await webhooks.ensure_delivery(ctx, hook, event)
        again, fresh_again = await webhooks.ensure_delivery(ctx, hook, event)
        assert fresh and fresh_again  # not enqueued yet: a re-run would enqueue it
        assert again["_id"] == doc["_id"]
        made.append(doc["_id"])
    assert await ctx.store["webhook_deliveries"].count_documents({}) == count
    return made


async def test_delivery_log_pages_newest_first(allowing: Any) -> None:
    auth = await auth_for(allowing)
    hook = await add(allowing, auth)
    made = await seed_deliveries(allowing.app, hook["id"], 3)
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        resp = await allowing.get(f"{W}/{hook['id']}/deliveries", params=params, headers=auth)
        page = await resp.json()
        seen += [d["id"] for d in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(made))
    resp = await allowing.get(f"{W}/{hook['id']}/deliveries", headers=auth)
    first = (await resp.json())["items"][0]
    assert (first["status"], first["attempts"], first["response_code"]) == ("pending", 0, None)


async def test_redeliver_resets_and_records_an_outbox_event(allowing: Any) -> None:
    auth = await auth_for(allowing)
    hook = await add(allowing, auth)
    [delivery_id] = await seed_deliveries(allowing.app, hook["id"], 1)
    store = allowing.app[CONTEXT].store
    await store["webhook_deliveries"].update_one(
        {"_id": delivery_id},
        {"$set": {"status": "dead", "attempts": 9, "response_code": 500, "last_error": "HTTP 500"}},
    )
    for generation in (1, 2):
        resp = await allowing.post(
            f"{W}/{hook['id']}/deliveries/{delivery_id}/redeliver", headers=auth
        )
        assert resp.status == 202
        body = await resp.json()
        assert (body["status"], body["attempts"], body["redeliveries"]) == (
            "pending",
            0,
            generation,
        )
        assert (body["response_code"], body["last_error"]) == (None, None)
    redelivery = EventType.WEBHOOK_REDELIVERY_REQUESTED
    requested = await store["events"].find({"type": redelivery}).to_list()
    assert sorted(e["data"]["generation"] for e in requested) == [1, 2]
    assert {e["data"]["delivery_id"] for e in requested} == {delivery_id}


async def test_needs_authentication(client: Any) -> None:
    assert (await client.get(W)).status == 401
    assert (await client.post(W, json={"url": LOOP, "events": ["*"]})).status == 401
