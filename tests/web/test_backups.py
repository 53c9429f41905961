"""``/admin/backups``: an admin starts a backup, a real worker takes it, the admin follows it."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from core import backups, jobruns, restore
from tests.conftest import bearer, eventually, register
from web.app import create_app
from web.keys import CONTEXT, PLATFORM
from workers.maintenance import enqueue_run

ADMIN = {"email": "root@example.com", "password": "admin password 1"}
URL = "/api/v1/admin/backups"


@pytest.fixture
async def setup(
    make_settings: Any, aiohttp_client: Any, tmp_path: Path
) -> tuple[Any, Any, dict[str, str]]:
    settings = make_settings(
        admin_email=ADMIN["email"],
        admin_password=ADMIN["password"],
        backup_dir=str(tmp_path / "backups"),
    )
    app = create_app(settings)
    client = await aiohttp_client(app)
    resp = await client.post("/api/v1/auth/login", json=ADMIN)
    assert resp.status == 200, await resp.text()
    return app, client, bearer((await resp.json())["access_token"])


async def follow(client: Any, url: str, auth: dict[str, str], timeout: float = 30.0) -> Any:
    """Poll a backup until it has finished (succeeded or failed)."""
    deadline = time.monotonic() + timeout
    while True:
        resp = await client.get(url, headers=auth)
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        if body["status"] in ("succeeded", "failed"):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"backup still {body['status']} after {timeout} s")
        await asyncio.sleep(0.1)


async def test_admin_starts_a_backup_that_a_worker_takes(setup: Any, worker_for: Any) -> None:
    app, client, admin = setup
    user = bearer((await register(client))["access_token"])
    for title in ("one", "two", "three"):
        assert (
            await client.post("/api/v1/tasks", json={"title": title}, headers=user)
        ).status == 201

    resp = await client.post(URL, headers=admin)
    assert resp.status == 202, await resp.text()
    queued = await resp.json()
    assert queued["status"] == "queued" and queued["manual"] is True
    assert resp.headers["Location"] == f"{URL}/{queued['id']}"
    again = await client.post(URL, headers=admin)  # one at a time
    assert again.status == 409 and queued["id"] in (await again.json())["detail"]
    worker_for(app)
    done = await follow(client, resp.headers["Location"], admin)

    assert done["status"] == "succeeded", done
    assert done["error"] is None and done["finished_at"] and done["size"] > 0
    counts = {c["name"]: c["documents"] for c in done["collections"]}
    assert counts["tasks"] == 3 and counts["users"] == 2  # the admin and the user
    assert "backups" not in counts
    assert restore.verify(Path(done["path"])).ok
    assert Path(done["path"]).name == queued["id"]

    # The job's run is settled after the actor returns, a moment after the backup's record.
    async def settled() -> Any:
        run = await jobruns.latest(app[CONTEXT], "backup")
        return run if run is not None and run["status"] in ("succeeded", "failed") else None

    run = await eventually(settled, "the backup's run settled")
    assert run["status"] == "succeeded" and run["manual"] is True
    assert run["result"]["backup_id"] == queued["id"]

    listed = await (await client.get(URL, headers=admin)).json()
    assert [b["id"] for b in listed["items"]] == [queued["id"]]
    assert listed["items"][0] == done and listed["next_cursor"] is None
    # Once it finished, the next one may start.
    resp = await client.post(URL, headers=admin)
    assert resp.status == 202, await resp.text()
    assert (await follow(client, resp.headers["Location"], admin))["status"] == "succeeded"


async def test_backups_need_the_admin_role(setup: Any) -> None:
    _, client, admin = setup
    user = bearer((await register(client))["access_token"])
    for method, path in (("GET", URL), ("POST", URL), ("GET", f"{URL}/{backups.new_id()}")):
        assert (await client.request(method, path)).status == 401, path
        resp = await client.request(method, path, headers=user)
        assert resp.status == 403, path
        assert resp.content_type == "application/problem+json"
    assert (await client.get(URL, headers=user)).status == 403
    listed = await (await client.get(URL, headers=admin)).json()
    assert listed["items"] == []  # the refused POST started nothing
    for missing in (backups.new_id(), "..%2F..%2Fetc"):
        resp = await client.get(f"{URL}/{missing}", headers=admin)
        assert resp.status == 404, missing


async def test_a_scheduled_fire_takes_a_backup_under_its_own_id(
    setup: Any, worker_for: Any
) -> None:
    app, client, admin = setup
    ctx = app[CONTEXT]
    slot = datetime(2024, 5, 1, 18, tzinfo=UTC)
    worker_for(app)
    key = await enqueue_run(
        ctx, app[PLATFORM].broker, "backup", "run_backup", fire_key="backup:1", scheduled_for=slot
    )
    backup_id = backups.id_for_fire(key, slot)
    assert backup_id.startswith("20240501T180000Z-")

    async def finished() -> bool:
        run = await ctx.store["job_runs"].find_one({"_id": key})
        return run is not None and run["status"] in ("succeeded", "failed")

    deadline = time.monotonic() + 30
    while not await finished():
        assert time.monotonic() < deadline, "the scheduled backup did not finish"
        await asyncio.sleep(0.1)
    done = await follow(client, f"{URL}/{backup_id}", admin)
    assert done["status"] == "succeeded" and done["manual"] is False
    assert {c["name"] for c in done["collections"]} >= {"users", "tasks", "events"}
