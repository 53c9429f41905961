"""Tasks over HTTP against the real MongoDB test server and Redis."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.conftest import bearer, register

T = "/api/v1/tasks"


@pytest.fixture
async def user(client: Any) -> dict[str, str]:
    pair = await register(client)
    return bearer(pair["access_token"])


async def create(client: Any, auth: dict[str, str], **fields: Any) -> dict[str, Any]:
    resp = await client.post(T, json={"title": "t", **fields}, headers=auth)
    assert resp.status == 201, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


async def test_create_defaults_location_etag(client: Any, user: dict[str, str]) -> None:
    resp = await client.post(T, json={"title": "  Buy milk  "}, headers=user)
    assert resp.status == 201
    task = await resp.json()
    assert resp.headers["Location"] == f"{T}/{task['id']}"
    assert resp.headers["ETag"].startswith('"')
    assert task["title"] == "Buy milk"
    assert (task["status"], task["priority"], task["description"]) == ("todo", "medium", "")
    assert task["tags"] == [] and task["due_at"] is None and task["completed_at"] is None
    got = await client.get(resp.headers["Location"], headers=user)
    assert got.status == 200
    assert await got.json() == task
    assert got.headers["ETag"] == resp.headers["ETag"]


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"title": ""}, "title"),
        ({"title": "x" * 201}, "title"),
        ({"title": "ok", "description": "x" * 10_001}, "description"),
        ({"title": "ok", "status": "finished"}, "status"),
        ({"title": "ok", "priority": "critical"}, "priority"),
        ({"title": "ok", "tags": [f"t{i}" for i in range(21)]}, "tags"),
        ({"title": "ok", "tags": ["x" * 51]}, "tags.0"),
        ({"title": "ok", "due_at": "2030-01-01T10:00:00"}, "due_at"),
        ({"title": "ok", "due_at": "tomorrow"}, "due_at"),
        ({"title": {"$gt": ""}}, "title"),
        ({"title": "ok", "owner": "someone"}, "owner"),
        ({"title": "ok", "tags": "work"}, "tags"),
    ],
)
async def test_create_rejects_bad_input(
    client: Any, user: dict[str, str], payload: Any, field: str
) -> None:
    resp = await client.post(T, json=payload, headers=user)
    assert resp.status == 422, await resp.text()
    assert resp.content_type == "application/problem+json"
    assert field in [e["field"] for e in (await resp.json())["errors"]]


async def test_completed_at_follows_status(client: Any, user: dict[str, str]) -> None:
    task = await create(client, user)
    done = await (
        await client.patch(f"{T}/{task['id']}", json={"status": "done"}, headers=user)
    ).json()
    assert done["completed_at"] is not None
    back = await (
        await client.patch(f"{T}/{task['id']}", json={"status": "in_progress"}, headers=user)
    ).json()
    assert back["completed_at"] is None
    born_done = await create(client, user, status="done")
    assert born_done["completed_at"] is not None


async def test_patch_partial_and_nulls(client: Any, user: dict[str, str]) -> None:
    due = iso(datetime.now(UTC) + timedelta(days=2))
    task = await create(client, user, description="d", due_at=due, tags=["a", "a", "b"])
    assert task["tags"] == ["a", "b"]
    resp = await client.patch(
        f"{T}/{task['id']}", json={"due_at": None, "description": None}, headers=user
    )
    changed = await resp.json()
    assert changed["due_at"] is None and changed["description"] == ""
    assert changed["title"] == "t" and changed["tags"] == ["a", "b"]
    resp = await client.patch(f"{T}/{task['id']}", json={"title": None}, headers=user)
    assert resp.status == 422


async def test_other_users_tasks_are_404_everywhere(client: Any, user: dict[str, str]) -> None:
    task = await create(client, user)
    other = bearer((await register(client))["access_token"])
    url = f"{T}/{task['id']}"
    assert (await client.get(url, headers=other)).status == 404
    assert (await client.patch(url, json={"title": "mine"}, headers=other)).status == 404
    assert (await client.delete(url, headers=other)).status == 404
    assert (await client.get(f"{url}/activity", headers=other)).status == 404
    listed = await (await client.get(T, headers=other)).json()
    assert listed["items"] == []
    resp = await client.post(f"{T}/bulk", json={"ids": [task["id"]], "delete": True}, headers=other)
    assert (await resp.json())["results"] == [{"id": task["id"], "result": "not_found"}]
    # ...and the owner's task is untouched.
    assert (await (await client.get(url, headers=user)).json())["title"] == "t"
    assert (await client.get(f"{T}/not-an-id", headers=user)).status == 404


async def test_etag_304_and_412(client: Any, user: dict[str, str]) -> None:
    task = await create(client, user)
    url = f"{T}/{task['id']}"
    first = await client.get(url, headers=user)
    tag = first.headers["ETag"]
    cached = await client.get(url, headers={**user, "If-None-Match": tag})
    assert cached.status == 304
    assert cached.headers["ETag"] == tag
    ok = await client.patch(url, json={"title": "v2"}, headers={**user, "If-Match": tag})
    assert ok.status == 200
    assert ok.headers["ETag"] != tag
    stale = await client.patch(url, json={"title": "v3"}, headers={**user, "If-Match": tag})
    assert stale.status == 412
    assert stale.content_type == "application/problem+json"
    assert (await client.get(url, headers={**user, "If-None-Match": tag})).status == 200
    assert (await client.delete(url, headers={**user, "If-Match": tag})).status == 412
    assert (
        await client.delete(url, headers={**user, "If-Match": ok.headers["ETag"]})
    ).status == 204
    assert (await client.get(url, headers=user)).status == 404


async def test_lost_update_race_one_wins_one_412(client: Any, user: dict[str, str]) -> None:
    task = await create(client, user)
    url = f"{T}/{task['id']}"
    tag = (await client.get(url, headers=user)).headers["ETag"]
    a, b = await asyncio.gather(
        client.patch(url, json={"title": "A"}, headers={**user, "If-Match": tag}),
        client.patch(url, json={"title": "B"}, headers={**user, "If-Match": tag}),
    )
    assert sorted([a.status, b.status]) == [200, 412]
    winner = a if a.status == 200 else b
    final = await (await client.get(url, headers=user)).json()
    assert final["title"] == (await winner.json())["title"]


async def test_concurrent_patches_without_if_match_are_not_lost(
    client: Any, user: dict[str, str]
) -> None:
    task = await create(client, user)
    url = f"{T}/{task['id']}"
    results = await asyncio.gather(
        client.patch(url, json={"title": "new title"}, headers=user),
        client.patch(url, json={"priority": "urgent"}, headers=user),
        client.patch(url, json={"tags": ["x"]}, headers=user),
    )
    assert [r.status for r in results] == [200, 200, 200]
    final = await (await client.get(url, headers=user)).json()
    assert (final["title"], final["priority"], final["tags"]) == ("new title", "urgent", ["x"])


async def test_filters(client: Any, user: dict[str, str]) -> None:
    now = datetime.now(UTC)
    day, hour = timedelta(days=1), timedelta(hours=1)
    a, b, c = [
        await create(client, user, title=t, status=s, priority=p, tags=g, due_at=iso(now + due))
        for t, s, p, g, due in (
            ("a", "done", "high", ["work"], -day),
            ("b", "todo", "high", ["home"], -hour),
            ("c", "todo", "low", ["work", "home"], 3 * day),
        )
    ]
    d = await create(client, user, title="d")

    async def ids(**params: str) -> set[str]:
        resp = await client.get(T, params=params, headers=user)
        assert resp.status == 200, await resp.text()
        return {t["id"] for t in (await resp.json())["items"]}

    assert await ids(status="done") == {a["id"]}
    assert await ids(priority="high") == {a["id"], b["id"]}
    assert await ids(tag="home") == {b["id"], c["id"]}
    assert await ids(overdue="true") == {b["id"]}
    assert await ids(overdue="false") == {a["id"], c["id"], d["id"]}
    assert await ids(due_before=iso(now)) == {a["id"], b["id"]}
    assert await ids(due_after=iso(now)) == {c["id"]}
    assert await ids(tag="work", priority="low") == {c["id"]}
    for bad in (
        {"status": "nope"},
        {"limit": "0"},
        {"limit": "201"},
        {"sort": "title"},
        {"due_before": "yesterday"},
        {"cursor": "forged"},
        {"colour": "red"},
    ):
        resp = await client.get(T, params=bad, headers=user)
        assert resp.status == 422, bad
        assert resp.content_type == "application/problem+json"


async def test_sorts(client: Any, user: dict[str, str]) -> None:
    now = datetime.now(UTC)
    made = [
        await create(
            client, user, title="p-low", priority="low", due_at=iso(now + timedelta(days=2))
        ),
        await create(client, user, title="p-urgent", priority="urgent"),
        await create(
            client, user, title="p-high", priority="high", due_at=iso(now + timedelta(days=1))
        ),
    ]
    await client.patch(f"{T}/{made[0]['id']}", json={"description": "touched"}, headers=user)

    async def titles(sort: str) -> list[str]:
        body = await (await client.get(T, params={"sort": sort}, headers=user)).json()
        return [t["title"] for t in body["items"]]

    assert await titles("created_at") == ["p-low", "p-urgent", "p-high"]
    assert await titles("-created_at") == ["p-high", "p-urgent", "p-low"]
    assert await titles("priority") == ["p-low", "p-high", "p-urgent"]
    assert await titles("-priority") == ["p-urgent", "p-high", "p-low"]
    assert await titles("due_at") == ["p-high", "p-low", "p-urgent"]  # no due date last
    assert await titles("-due_at") == ["p-urgent", "p-low", "p-high"]
    assert (await titles("-updated_at"))[0] == "p-low"


async def test_pagination_walk_is_complete_under_concurrent_inserts(
    client: Any, user: dict[str, str]
) -> None:
    originals = {
        (await create(client, user, title=f"orig {i}", priority=["low", "high"][i % 2]))["id"]
        for i in range(23)
    }
    for sort in ("-created_at", "created_at", "priority", "-due_at"):
        seen: list[str] = []
        cursor = None
        pages = 0
        while True:
            params = {"limit": "5", "sort": sort, **({"cursor": cursor} if cursor else {})}
            page = await (await client.get(T, params=params, headers=user)).json()
            seen += [t["id"] for t in page["items"]]
            # Someone keeps adding tasks while we walk.
            await create(client, user, title=f"new during {sort} {pages}", priority="urgent")
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
            assert pages < 50
        assert len(seen) == len(set(seen)), f"duplicates in {sort} walk"
        assert originals <= set(seen), f"missing items in {sort} walk"


async def test_cursor_is_bound_to_its_sort(client: Any, user: dict[str, str]) -> None:
    for i in range(3):
        await create(client, user, title=str(i))
    page = await (await client.get(T, params={"limit": "1"}, headers=user)).json()
    resp = await client.get(
        T, params={"limit": "1", "sort": "priority", "cursor": page["next_cursor"]}, headers=user
    )
    assert resp.status == 422


async def test_bulk_set_and_delete(client: Any, user: dict[str, str]) -> None:
    mine = [await create(client, user, title=f"b{i}") for i in range(3)]
    other_auth = bearer((await register(client))["access_token"])
    theirs = await create(client, other_auth, title="theirs")
    ids = [m["id"] for m in mine] + [theirs["id"], "garbage"]
    resp = await client.post(
        f"{T}/bulk", json={"ids": ids, "set": {"status": "done", "tags": ["bulk"]}}, headers=user
    )
    assert resp.status == 200
    results = {r["id"]: r["result"] for r in (await resp.json())["results"]}
    assert results == {
        **{m["id"]: "updated" for m in mine},
        theirs["id"]: "not_found",
        "garbage": "not_found",
    }
    for m in mine:
        t = await (await client.get(f"{T}/{m['id']}", headers=user)).json()
        assert t["status"] == "done" and t["tags"] == ["bulk"] and t["completed_at"]
    assert (await (await client.get(f"{T}/{theirs['id']}", headers=other_auth)).json())[
        "status"
    ] == "todo"
    again = await client.post(
        f"{T}/bulk", json={"ids": [mine[0]["id"]], "set": {"status": "done"}}, headers=user
    )
    assert (await again.json())["results"][0]["result"] == "unchanged"
    resp = await client.post(
        f"{T}/bulk", json={"ids": [m["id"] for m in mine[:2]], "delete": True}, headers=user
    )
    assert [r["result"] for r in (await resp.json())["results"]] == ["deleted", "deleted"]
    assert (await client.get(f"{T}/{mine[0]['id']}", headers=user)).status == 404
    assert (await client.get(f"{T}/{theirs['id']}", headers=other_auth)).status == 200


@pytest.mark.parametrize(
    "payload",
    [
        {"ids": []},
        {"ids": ["a"], "set": {"status": "done"}, "delete": True},
        {"ids": ["a"]},
        {"ids": ["a"], "set": {}},
        {"ids": ["a"] * 501, "delete": True},
        {"ids": ["a"], "set": {"title": "no"}},
    ],
)
async def test_bulk_rejects_bad_requests(client: Any, user: dict[str, str], payload: Any) -> None:
    resp = await client.post(f"{T}/bulk", json=payload, headers=user)
    assert resp.status == 422


async def test_activity_newest_first_with_pagination(client: Any, user: dict[str, str]) -> None:
    task = await create(client, user)
    url = f"{T}/{task['id']}"
    await client.patch(url, json={"title": "renamed"}, headers=user)
    await client.patch(url, json={"status": "done"}, headers=user)
    body = await (await client.get(f"{url}/activity", headers=user)).json()
    types = [e["type"] for e in body["items"]]
    assert types == ["task.completed", "task.updated", "task.updated", "task.created"]
    assert body["items"][2]["data"]["changes"]["title"] == {"from": "t", "to": "renamed"}
    page1 = await (await client.get(f"{url}/activity", params={"limit": "3"}, headers=user)).json()
    page2 = await (
        await client.get(
            f"{url}/activity", params={"limit": "3", "cursor": page1["next_cursor"]}, headers=user
        )
    ).json()
    assert [e["id"] for e in page1["items"] + page2["items"]] == [e["id"] for e in body["items"]]
    assert page2["next_cursor"] is None


async def test_stats_cached_and_never_stale_after_a_write(
    client: Any, user: dict[str, str]
) -> None:
    now = datetime.now(UTC)
    await create(client, user, priority="high", due_at=iso(now - timedelta(minutes=5)))
    await create(client, user, status="done")
    first = await client.get(f"{T}/stats", headers=user)
    stats = await first.json()
    assert first.headers["X-Cache"] == "miss"
    assert (
        stats["total"] == 2
        and stats["by_status"]["done"] == 1
        and stats["by_priority"]["high"] == 1
    )
    assert stats["overdue"] == 1
    second = await client.get(f"{T}/stats", headers=user)
    assert second.headers["X-Cache"] == "hit"
    assert await second.json() == stats
    created = await create(client, user)
    after = await (await client.get(f"{T}/stats", headers=user)).json()
    assert after["total"] == 3 and after["by_status"]["todo"] == 2
    await client.delete(f"{T}/{created['id']}", headers=user)
    assert (await (await client.get(f"{T}/stats", headers=user)).json())["total"] == 2


async def test_stats_expire_when_a_task_falls_due(client: Any, user: dict[str, str]) -> None:
    soon = datetime.now(UTC) + timedelta(seconds=1.5)
    await create(client, user, due_at=iso(soon))
    assert (await (await client.get(f"{T}/stats", headers=user)).json())["overdue"] == 0
    await asyncio.sleep(max(0.0, (soon - datetime.now(UTC)).total_seconds()) + 0.2)
    resp = await client.get(f"{T}/stats", headers=user)
    assert (await resp.json())["overdue"] == 1
    assert resp.headers["X-Cache"] == "miss"


async def test_idempotent_create_three_concurrent_posts_make_one_task(
    client: Any, user: dict[str, str]
) -> None:
    headers = {**user, "Idempotency-Key": "create-milk-1"}
    responses = await asyncio.gather(
        *[client.post(T, json={"title": "milk"}, headers=headers) for _ in range(3)]
    )
    statuses = sorted(r.status for r in responses)
    assert statuses.count(201) >= 1 and set(statuses) <= {201, 409}
    created = [await r.json() for r in responses if r.status == 201]
    assert len({c["id"] for c in created}) == 1
    listed = await (await client.get(T, headers=user)).json()
    assert [t["title"] for t in listed["items"]] == ["milk"]
    replay = await client.post(T, json={"title": "milk"}, headers=headers)
    assert replay.status == 201
    assert (await replay.json())["id"] == created[0]["id"]
    assert replay.headers["Idempotent-Replayed"] == "true"
    other = await client.post(T, json={"title": "bread"}, headers=headers)
    assert other.status == 422


async def test_an_unreadable_cache_entry_is_a_miss(
    app: Any, client: Any, user: dict[str, str]
) -> None:
    from web.keys import CONTEXT

    await create(client, user)
    first = await client.get(f"{T}/stats", headers=user)
    ctx = app[CONTEXT]
    [key] = [k async for k in ctx.redis.scan_iter(match=ctx.key("cache", "stats", "*"))]
    await ctx.redis.set(key, b'{"gen": 0, "value": {}}')  # e.g. written by an older release
    again = await client.get(f"{T}/stats", headers=user)
    assert again.status == 200
    assert again.headers["X-Cache"] == "miss"
    assert await again.json() == await first.json()
