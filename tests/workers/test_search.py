"""Search end to end: API → outbox → relay → Redis broker → index_task actor → GET /search."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from bson import ObjectId

from core import search
from core.events import public_event
from tests.conftest import bearer, register
from web.keys import CONTEXT, PLATFORM

S = "/api/v1/search"
T = "/api/v1/tasks"
#: The contract says "about 1 s"; the margin absorbs a loaded CI machine.
SEARCHABLE_WITHIN = 2.0


async def found(client: Any, auth: dict[str, str], q: str) -> list[str]:
    resp = await client.get(S, params={"q": q}, headers=auth)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    return [hit["task"]["id"] for hit in body["items"]]


async def eventually(client: Any, auth: dict[str, str], q: str, expected: list[str]) -> None:
    """Poll until the search for ``q`` returns exactly ``expected``."""
    deadline = time.monotonic() + SEARCHABLE_WITHIN
    while (got := await found(client, auth, q)) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"search {q!r}: {got} after {SEARCHABLE_WITHIN} s, not {expected}")
        await asyncio.sleep(0.05)


async def test_write_is_searchable_then_follows_updates_and_deletes(
    broker_settings: Any, aiohttp_client: Any, worker_for: Any
) -> None:
    """Runs over both real brokers (Redis and RabbitMQ)."""
    from web.app import create_app

    app = create_app(broker_settings())
    client = await aiohttp_client(app)
    worker_for(app)
    ann = bearer((await register(client))["access_token"])
    bob = bearer((await register(client))["access_token"])
    resp = await client.post(
        T, json={"title": "Quarterly planning review", "tags": ["finance"]}, headers=ann
    )
    assert resp.status == 201
    task = await resp.json()
    # Bob's task with the same words, indexed too (awaited below) so that its absence from
    # Ann's results means something.
    resp = await client.post(T, json={"title": "Quarterly planning review"}, headers=bob)
    bobs = (await resp.json())["id"]

    await eventually(client, ann, "quart plan", [task["id"]])
    await eventually(client, bob, "quart plan", [bobs])
    assert await found(client, ann, "review") == [task["id"]]
    assert await found(client, ann, "fin") == [task["id"]]

    resp = await client.patch(f"{T}/{task['id']}", json={"title": "Budget offsite"}, headers=ann)
    assert resp.status == 200
    await eventually(client, ann, "offs", [task["id"]])
    assert await found(client, ann, "quarterly") == []
    index = app[CONTEXT].store[search.COLLECTION]
    stored = await index.find_one({"_id": ObjectId(task["id"])})
    # The entry itself moved on (the search re-check alone would hide "quarterly").
    assert stored is not None and stored["version"] == 2
    assert "offsite" in stored["terms"] and "quarterly" not in stored["terms"]

    resp = await client.delete(f"{T}/{task['id']}", headers=ann)
    assert resp.status == 204
    deadline = time.monotonic() + SEARCHABLE_WITHIN
    while "deleted_at" not in (await index.find_one({"_id": ObjectId(task["id"])}) or {}):
        assert time.monotonic() < deadline, "the deleted task's entry was not removed"
        await asyncio.sleep(0.05)
    assert await found(client, ann, "offsite") == []
    assert await found(client, bob, "quarterly") == [bobs]


async def test_a_replayed_old_event_indexes_the_current_state(
    app: Any, client: Any, worker_for: Any
) -> None:
    worker_for(app)
    ann = bearer((await register(client))["access_token"])
    resp = await client.post(T, json={"title": "Renew passport"}, headers=ann)
    task = await resp.json()
    await eventually(client, ann, "passp", [task["id"]])
    resp = await client.patch(f"{T}/{task['id']}", json={"title": "Renew visa"}, headers=ann)
    await eventually(client, ann, "visa", [task["id"]])
    # Mark the entry as written by an older analyzer, so that the replay must rewrite it.
    index = app[CONTEXT].store[search.COLLECTION]
    tid = ObjectId(task["id"])
    await index.update_one({"_id": tid}, {"$set": {"analyzer": search.ANALYZER - 1}})
    # Replay the creation event (its snapshot says "passport"), twice, as an at-least-once
    # broker may.
    event = await app[CONTEXT].store["events"].find_one({"type": "task.created"})
    assert event is not None and event["data"]["task"]["title"] == "Renew passport"
    actor = app[PLATFORM].actors["index_task"]
    for _ in range(2):
        await asyncio.to_thread(actor.send, public_event(event))
    await asyncio.to_thread(app[PLATFORM].broker.join, actor.queue_name, timeout=10_000)
    stored = await index.find_one({"_id": tid})
    assert stored is not None and stored["analyzer"] == search.ANALYZER
    assert "visa" in stored["terms"] and "passport" not in stored["terms"]
    assert await found(client, ann, "visa") == [task["id"]]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({}, "q"),
        ({"q": ""}, "q"),
        ({"q": "   "}, "q"),
        ({"q": "x" * 201}, "q"),
        ({"q": " ".join(f"w{i}" for i in range(11))}, "q"),
        ({"q": "ok", "limit": "0"}, "limit"),
        ({"q": "ok", "limit": "51"}, "limit"),
        ({"q": "ok", "limit": "many"}, "limit"),
        ({"q": "ok", "sort": "title"}, "sort"),
    ],
)
async def test_bad_queries_are_422_problems(
    client: Any, params: dict[str, str], field: str
) -> None:
    auth = bearer((await register(client))["access_token"])
    resp = await client.get(S, params=params, headers=auth)
    assert resp.status == 422
    assert resp.content_type == "application/problem+json"
    problem = await resp.json()
    assert field in [e["field"] for e in problem["errors"]]


async def test_search_needs_a_token_and_punctuation_finds_nothing(client: Any) -> None:
    resp = await client.get(S, params={"q": "milk"})
    assert resp.status == 401
    auth = bearer((await register(client))["access_token"])
    resp = await client.get(S, params={"q": "?!"}, headers=auth)
    assert resp.status == 200
    assert await resp.json() == {"items": [], "words": []}
