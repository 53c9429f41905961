"""``taskmanager reindex``: the console command, configured from the environment like in
production, against the test database; the app answers the searches."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from click.testing import CliRunner, Result

from cli.main import main
from config.settings import Settings
from core import search
from tests.conftest import bearer, register
from web.keys import CONTEXT

T = "/api/v1/tasks"


async def invoke(*args: str) -> Result:
    """Run the command as the console script would (on a thread: it runs its own loop)."""
    return await asyncio.to_thread(CliRunner().invoke, main, ["reindex", *args])


async def titles(client: Any, auth: dict[str, str], q: str) -> list[str]:
    resp = await client.get("/api/v1/search", params={"q": q}, headers=auth)
    assert resp.status == 200
    return sorted(hit["task"]["title"] for hit in (await resp.json())["items"])


async def test_reindex_rebuilds_a_wiped_index(app: Any, client: Any, cli_env: Settings) -> None:
    ann_pair, bob_pair = await register(client), await register(client)
    ann, bob = bearer(ann_pair["access_token"]), bearer(bob_pair["access_token"])
    for title in ("Alpha launch", "Beta launch", "Gamma retro"):
        assert (await client.post(T, json={"title": title}, headers=ann)).status == 201
    assert (await client.post(T, json={"title": "Alpha launch"}, headers=bob)).status == 201
    # No worker runs here; wipe anyway so the index is certainly empty.
    index = app[CONTEXT].store[search.COLLECTION]
    await index.delete_many({})
    assert await titles(client, ann, "launch") == []

    result = await invoke("--user", ann_pair["user"]["id"])
    assert result.exit_code == 0, result.output
    assert "indexed 3 tasks (3 entries written, 0 of deleted tasks removed)" in result.stdout
    assert await titles(client, ann, "launch") == ["Alpha launch", "Beta launch"]
    assert await titles(client, bob, "alpha") == []  # another user's tasks were not touched

    result = await invoke("--batch-size", "2")
    assert result.exit_code == 0, result.output
    assert "indexed 4 tasks" in result.stdout
    assert "4/4" in result.stderr  # the progress bar, on stderr
    assert await titles(client, bob, "alpha") == ["Alpha launch"]
    assert await titles(client, ann, "alpha") == ["Alpha launch"]

    # A task deleted behind the index's back (say its event was lost) leaves the index.
    await app[CONTEXT].store["tasks"].delete_one({"title": "Gamma retro"})
    result = await invoke()
    assert result.exit_code == 0, result.output
    assert "indexed 3 tasks (3 entries written, 1 of deleted tasks removed)" in result.stdout
    assert await index.count_documents({"deleted_at": {"$exists": True}}) == 1


async def test_reindex_needs_mongodb(cli_env: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MONGODB_URL")
    result = await invoke()
    assert result.exit_code == 1
    assert "MONGODB_URL must be set" in result.output
