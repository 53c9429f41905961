"""Analytics over HTTP: API → outbox → relay → worker (fold_analytics) → scheduled rollup →
``GET /analytics/summary``, against the real MongoDB test server and Redis."""

from __future__ import annotations

import asyncio
import statistics
from datetime import UTC, date, datetime
from typing import Any

import pytest

from core import analytics, jobruns
from core.context import Context
from core.events import public_event
from tests.conftest import bearer, eventually, register
from web.keys import CONTEXT, PLATFORM
from workers.maintenance import enqueue_run

URL = "/api/v1/analytics/summary"
T = "/api/v1/tasks"


async def create(client: Any, auth: dict[str, str], **fields: Any) -> dict[str, Any]:
    resp = await client.post(T, json={"title": "t", **fields}, headers=auth)
    assert resp.status == 201, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def complete(client: Any, auth: dict[str, str], task_id: str) -> dict[str, Any]:
    resp = await client.patch(f"{T}/{task_id}", json={"status": "done"}, headers=auth)
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


def moment(text: str) -> datetime:
    return datetime.fromisoformat(text)


async def counted(ctx: Context, user_id: str, day: str) -> tuple[int, int]:
    await analytics.compact(ctx)
    doc = await ctx.store["analytics_counters"].find_one({"_id": f"{user_id}:{day}"}) or {}
    return doc.get("created", 0), doc.get("completed", 0)


async def test_summary_shows_the_caller_s_rolled_up_day(
    app: Any, client: Any, worker_for: Any
) -> None:
    worker_for(app)
    ctx: Context = app[CONTEXT]
    ann, bob = await register(client), await register(client)
    a, b = bearer(ann["access_token"]), bearer(bob["access_token"])
    made = [await create(client, a, title=f"a{i}") for i in range(3)]
    done = [await complete(client, a, t["id"]) for t in made[:2]]
    await complete(client, b, (await create(client, b))["id"])
    day = moment(done[0]["completed_at"]).date().isoformat()
    ann_id, bob_id = ann["user"]["id"], bob["user"]["id"]

    async def folded() -> bool:
        return await counted(ctx, ann_id, day) == (3, 2) and await counted(ctx, bob_id, day) == (
            1,
            1,
        )

    await eventually(folded, "fold_analytics to count every event", timeout=30)
    key = await enqueue_run(ctx, app[PLATFORM].broker, "analytics-rollup", "rollup_analytics")

    async def rolled_up() -> bool:
        run = await ctx.store["job_runs"].find_one({"_id": key})
        return run is not None and run["status"] in ("succeeded", "failed")

    await eventually(rolled_up, "the rollup run", timeout=30)
    run = await jobruns.latest(ctx, "analytics-rollup")
    assert run is not None and run["status"] == "succeeded", run
    assert day in run["result"]["days"]

    resp = await client.get(URL, params={"from": day, "to": day}, headers=a)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    [figures] = body["days"]
    assert figures["day"] == day
    assert (figures["created"], figures["completed"], figures["deleted"]) == (3, 2, 0)
    durations = [
        int((moment(t["completed_at"]) - moment(t["created_at"])).total_seconds() * 1000)
        for t in done
    ]
    assert figures["median_completion_seconds"] == round(statistics.median(durations) / 1000, 3)
    assert figures["rolled_up_at"] is not None
    assert body["totals"] == {"created": 3, "completed": 2, "deleted": 0}
    # Bob sees only his own figures, and Ann's never include his.
    theirs = await (await client.get(URL, params={"from": day, "to": day}, headers=b)).json()
    assert theirs["totals"] == {"created": 1, "completed": 1, "deleted": 0}


async def test_a_deleted_task_is_counted_and_a_redelivery_is_not(
    app: Any, client: Any, worker_for: Any
) -> None:
    worker_for(app)
    ctx: Context = app[CONTEXT]
    broker = app[PLATFORM].broker
    pair = await register(client)
    auth, user_id = bearer(pair["access_token"]), pair["user"]["id"]
    task = await create(client, auth)
    assert (await client.delete(f"{T}/{task['id']}", headers=auth)).status == 204
    day = moment(task["created_at"]).date().isoformat()

    async def both_folded() -> bool:
        return await ctx.store["analytics_seen"].count_documents({}) == 2

    await eventually(both_folded, "both events folded", timeout=30)
    # Redeliver the creation event twice, as an at-least-once broker may.
    stored = await ctx.store["events"].find_one({"type": "task.created", "user_id": user_id})
    assert stored is not None
    for _ in range(2):
        await asyncio.to_thread(app[PLATFORM].actors["fold_analytics"].send, public_event(stored))
    await asyncio.to_thread(broker.join, "analytics", timeout=30_000)
    await analytics.compact(ctx)
    doc = await ctx.store["analytics_counters"].find_one({"_id": f"{user_id}:{day}"})
    assert doc is not None
    assert (doc.get("created"), doc.get("completed"), doc.get("deleted")) == (1, None, 1), doc


async def test_default_range_is_the_last_30_days(client: Any) -> None:
    auth = bearer((await register(client))["access_token"])
    before = datetime.now(UTC).date()
    resp = await client.get(URL, headers=auth)
    after = datetime.now(UTC).date()
    assert resp.status == 200
    body = await resp.json()
    assert len(body["days"]) == 30
    assert date.fromisoformat(body["days"][-1]["day"]) in (before, after)
    assert all(d["created"] == 0 and d["median_completion_seconds"] is None for d in body["days"])
    assert body["totals"] == {"created": 0, "completed": 0, "deleted": 0}


async def test_a_leap_year_is_within_the_limit(client: Any) -> None:
    auth = bearer((await register(client))["access_token"])
    resp = await client.get(URL, params={"from": "2024-01-01", "to": "2024-12-31"}, headers=auth)
    assert resp.status == 200
    assert len((await resp.json())["days"]) == 366


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"from": "2024-05-02", "to": "2024-05-01"}, "from"),
        ({"from": "2024-01-01", "to": "2025-01-01"}, "from"),
        ({"from": "2024-1-1"}, "from"),
        ({"from": "2024-02-30"}, "from"),
        ({"to": "1700000000"}, "to"),
        ({"to": "2024-05-01T00:00:00Z"}, "to"),
        ({"from_": "2024-05-01"}, "from_"),
        ([("from", "2024-05-01"), ("from", "2024-05-02")], "from"),
    ],
)
async def test_bad_ranges_are_422_problems(client: Any, params: Any, field: str) -> None:
    auth = bearer((await register(client))["access_token"])
    resp = await client.get(URL, params=params, headers=auth)
    assert resp.status == 422, await resp.text()
    assert resp.content_type == "application/problem+json"
    assert field in [e["field"] for e in (await resp.json())["errors"]]


async def test_summary_needs_a_token(client: Any) -> None:
    resp = await client.get(URL)
    assert resp.status == 401
    assert resp.content_type == "application/problem+json"


async def test_openapi_names_the_from_and_to_parameters(client: Any) -> None:
    doc = await (await client.get("/api/v1/openapi.json")).json()
    op = doc["paths"][URL]["get"]
    params = {p["name"]: p for p in op["parameters"] if p["in"] == "query"}
    assert set(params) == {"from", "to"}
    assert params["from"]["schema"] == {"type": "string", "format": "date"}
    assert not params["from"]["required"] and not params["to"]["required"]
    assert "422" in op["responses"] and "200" in op["responses"]
