"""``GET /admin/history`` (counts written by a real in-process worker into real Redis) and
``GET /admin/schedules/{name}/runs`` (from ``job_runs`` in SecantusDB): shapes, windows,
alignment, errors and the admin role."""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import dramatiq

from core.history import add_counts, read_history
from tests.conftest import bearer, eventually, register
from web.keys import CONTEXT, PLATFORM

HISTORY = "/api/v1/admin/history"
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
ISO_Z_ANY = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


async def get_json(client: Any, path: str, auth: dict[str, str], status: int = 200) -> Any:
    resp = await client.get(path, headers=auth)
    assert resp.status == status, await resp.text()
    return await resp.json()


async def test_history_counts_a_real_workers_messages(setup: Any, worker_for: Any) -> None:
    app, client, auth = setup
    broker = app[PLATFORM].broker
    tag = uuid.uuid4().hex[:8]
    queue, actor_name = f"hist_{tag}", f"hist_probe_{tag}"

    def probe(fail: bool) -> None:
        if fail:
            raise ValueError("no")

    actor: Any = dramatiq.actor(  # type: ignore[call-overload]
        probe,
        broker=broker,
        queue_name=queue,
        actor_name=actor_name,
        throws=(ValueError,),
    )
    worker_for(app)
    for fail in (False, False, False, True):
        await asyncio.to_thread(actor.send, fail)

    async def counted() -> Any:
        body = await get_json(client, HISTORY, auth)
        series = body["queues"].get(queue)
        return series and sum(series["processed"]) == 4 and sum(series["failed"]) == 1 and body

    body = await eventually(counted, "4 processed and 1 failed in the last hour", timeout=20)
    assert set(body) == {"window", "step_seconds", "since", "until", "queues", "actors"}
    assert body["window"] == "1h" and body["step_seconds"] == 60
    assert ISO_Z.match(body["since"]) and ISO_Z.match(body["until"])
    since = datetime.fromisoformat(body["since"])
    until = datetime.fromisoformat(body["until"])
    assert until - since == timedelta(hours=1) and since.second == 0
    assert since < datetime.now(UTC) < until
    for table in ("queues", "actors"):
        for series in body[table].values():
            assert set(series) == {"processed", "failed"}
            assert len(series["processed"]) == len(series["failed"]) == 60
    # All in the current minute or the one before (the last points), nothing older.
    series = body["actors"][actor_name]
    assert sum(series["processed"][-2:]) == 4 and sum(series["processed"][:-2]) == 0
    assert sum(series["failed"]) == 1

    day = await get_json(client, f"{HISTORY}?window=24h", auth)
    assert day["window"] == "24h" and day["step_seconds"] == 600
    assert datetime.fromisoformat(day["until"]) - datetime.fromisoformat(day["since"]) == (
        timedelta(hours=24)
    )
    assert datetime.fromisoformat(day["since"]).minute % 10 == 0
    daily = day["queues"][queue]
    assert len(daily["processed"]) == 144 and sum(daily["processed"][-2:]) == 4
    assert sum(daily["failed"]) == 1

    # The overview's Python entry point answers the same.
    from core.history import history_summary

    summary = await history_summary(app[CONTEXT])
    assert sum(summary.queues[queue].processed) == 4


async def test_points_fall_in_their_step_and_old_minutes_stay_out(setup: Any) -> None:
    """Counts written at known minutes land in the right point of each window (read with a
    fixed ``now``); a minute older than the window is not shown."""
    app, _, _ = setup
    ctx = app[CONTEXT]
    now = 1_800_000_000 + 37  # 37 s into a minute that is also a 10-minute boundary
    minute = now // 60

    async def put(minutes_ago: int, count: int) -> None:
        # As the workers write them (minute and 10-minute hashes).
        pipe = ctx.redis.pipeline(transaction=False)
        at = minute - minutes_ago
        add_counts(pipe, ctx.settings.redis_prefix, {(at, "qp:q"): count, (at, "qf:q"): 1})
        add_counts(pipe, ctx.settings.redis_prefix, {(at, "ap:a"): count})
        await pipe.execute()

    await put(0, 7)  # this minute: the last point of both windows
    await put(59, 5)  # the first point of the hour
    await put(60, 100)  # just outside the hour
    await put(1430, 11)  # the day's oldest minute (outside the hour)
    await put(24 * 60, 1000)  # outside the day (since is 23 h 50 min before this minute)

    hour = await read_history(ctx.redis, ctx.settings.redis_prefix, "1h", now=now)
    assert hour.queues["q"].processed[-1] == 7 and hour.queues["q"].processed[0] == 5
    assert sum(hour.queues["q"].processed) == 12 and sum(hour.queues["q"].failed) == 2
    assert hour.actors["a"].processed[-1] == 7
    assert hour.until == datetime.fromtimestamp((minute + 1) * 60, UTC)

    day = await read_history(ctx.redis, ctx.settings.redis_prefix, "24h", now=now)
    assert day.until == datetime.fromtimestamp((minute + 10) * 60, UTC)  # minute % 10 == 0
    processed = day.queues["q"].processed
    assert processed[-1] == 7  # [minute, minute + 10)
    assert processed[-7] == 5 + 100  # 59 and 60 minutes ago: [minute - 60, minute - 50)
    assert processed[0] == 11  # the oldest point: [minute - 1430, minute - 1420)
    assert sum(processed) == 7 + 5 + 100 + 11


async def test_bad_windows_and_parameters_are_422_problems(setup: Any) -> None:
    _, client, auth = setup
    for path in (f"{HISTORY}?window=2h", f"{HISTORY}?window=", f"{HISTORY}?since=1"):
        resp = await client.get(path, headers=auth)
        assert resp.status == 422, path
        assert resp.content_type == "application/problem+json"
        problem = await resp.json()
        assert problem["status"] == 422 and problem["errors"], problem


async def test_history_and_runs_need_the_admin_role(setup: Any) -> None:
    _, client, _ = setup
    user = await register(client)
    for path in (HISTORY, "/api/v1/admin/schedules/backup/runs"):
        assert (await client.get(path)).status == 401, path
        resp = await client.get(path, headers=bearer(user["access_token"]))
        assert resp.status == 403, path
        assert resp.content_type == "application/problem+json"


async def test_schedule_runs_newest_first_and_bounded(setup: Any) -> None:
    app, client, auth = setup
    ctx = app[CONTEXT]
    # Recent runs: job_runs has a 30-day TTL index on enqueued_at, whose monitor deleted older
    # ones in the middle of this test once (CI, 2026-12-01).
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)
    docs = []
    for n in range(25):
        slot = base + timedelta(minutes=5 * n)
        doc: dict[str, Any] = {
            "_id": f"due-soon-reminders:{slot:%Y%m%dT%H%M%SZ}",
            "job": "due-soon-reminders",
            "status": "succeeded",
            "manual": False,
            "scheduled_for": slot,
            "enqueued_at": slot,
            "started_at": slot + timedelta(seconds=1),
            "finished_at": slot + timedelta(seconds=3, milliseconds=250),
            "duration_ms": 2250,
            "error": None,
        }
        if n == 24:
            doc.update(status="failed", error="SMTP refused")
        docs.append(doc)
    docs.append(
        {
            "_id": "backup:x",
            "job": "backup",
            "status": "enqueued",
            "manual": True,
            "enqueued_at": base,
        }
    )
    await ctx.store["job_runs"].insert_many(docs)

    path = "/api/v1/admin/schedules/due-soon-reminders/runs"
    body = await get_json(client, path, auth)
    assert set(body) == {"items"}
    items = body["items"]
    assert len(items) == 20  # the default limit
    assert [i["fire_key"] for i in items] == [d["_id"] for d in reversed(docs[5:25])]
    newest = items[0]
    assert set(newest) == {
        "fire_key", "scheduled_for", "enqueued_at", "status", "started_at", "finished_at",
        "duration_seconds", "error", "manual",
    }  # fmt: skip
    assert newest["status"] == "failed" and newest["error"] == "SMTP refused"
    assert newest["duration_seconds"] == 2.25 and newest["manual"] is False
    for name in ("scheduled_for", "enqueued_at", "started_at", "finished_at"):
        assert ISO_Z_ANY.match(newest[name]), newest[name]

    assert len((await get_json(client, f"{path}?limit=3", auth))["items"]) == 3
    assert len((await get_json(client, f"{path}?limit=100", auth))["items"]) == 25
    for bad in ("0", "101", "x"):
        await get_json(client, f"{path}?limit={bad}", auth, status=422)

    manual = await get_json(client, "/api/v1/admin/schedules/backup/runs", auth)
    [run] = manual["items"]
    assert run["manual"] is True and run["scheduled_for"] is None
    assert run["started_at"] is None and run["duration_seconds"] is None
    assert (await get_json(client, "/api/v1/admin/schedules/analytics-rollup/runs", auth)) == {
        "items": []
    }

    resp = await client.get("/api/v1/admin/schedules/nope/runs", headers=auth)
    assert resp.status == 404 and resp.content_type == "application/problem+json"

    # Runs are bounded: job_runs expire 30 days after they were fired (TTL index).
    indexes = await ctx.store["job_runs"].index_information()
    assert indexes["ttl"]["expireAfterSeconds"] == 30 * 86400
    assert indexes["ttl"]["key"] == [("enqueued_at", 1)]


async def test_the_openapi_document_describes_both(setup: Any) -> None:
    _, client, _ = setup
    doc = await (await client.get("/api/v1/openapi.json")).json()
    history = doc["paths"]["/api/v1/admin/history"]["get"]
    [window] = [p for p in history["parameters"] if p["name"] == "window"]
    assert set(window["schema"]["enum"]) == {"1h", "24h"}
    assert "422" in history["responses"]
    runs = doc["paths"]["/api/v1/admin/schedules/{name}/runs"]["get"]
    assert {"404", "422"} <= set(runs["responses"])
