"""``/api/v1/admin/share-weights``: the fair-share weights of FAIR_SHARE_WEIGHTS and those set
through the API (stored in SecantusDB, winning key by key), setting and dropping one, bad keys
and weights, the admin role."""

from __future__ import annotations

from typing import Any

import pytest

from core import fairness
from tests.conftest import bearer, register
from tests.web.conftest import ADMIN
from web.app import create_app
from web.keys import CONTEXT

WEIGHTS = "/api/v1/admin/share-weights"


@pytest.fixture
async def setup(make_settings: Any, aiohttp_client: Any) -> tuple[Any, Any, dict[str, str]]:
    """As tests/web/conftest.py's ``setup``, with weights in the settings."""
    settings = make_settings(
        admin_email=ADMIN["email"],
        admin_password=ADMIN["password"],
        fair_share_window=8,
        fair_share_budget=50,
        fair_share_weights="alice=4,role:admin=2",
    )
    app = create_app(settings)
    client = await aiohttp_client(app)
    resp = await client.post("/api/v1/auth/login", json=ADMIN)
    assert resp.status == 200, await resp.text()
    return app, client, bearer((await resp.json())["access_token"])


def _settings_item(key: str, weight: int) -> dict[str, Any]:
    return {
        "key": key,
        "weight": weight,
        "source": "settings",
        "window": 8 * weight,
        "updated_at": None,
        "updated_by": None,
    }


async def test_list_merges_settings_and_stored_weights(setup: Any) -> None:
    app, client, auth = setup
    resp = await client.get(WEIGHTS, headers=auth)
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {
        "window": 8,
        "budget": 50,
        "fair_share": True,
        "items": [_settings_item("alice", 4), _settings_item("role:admin", 2)],
    }

    # Stored weights (as another admin or the CLI left them) win over the settings' key.
    ctx = app[CONTEXT]
    await fairness.set_weight(ctx, "alice", 10, by="someone")
    await fairness.set_weight(ctx, "bob", 3)
    items = (await (await client.get(WEIGHTS, headers=auth)).json())["items"]
    assert [(i["key"], i["weight"], i["source"], i["window"]) for i in items] == [
        ("alice", 10, "admin", 80),
        ("bob", 3, "admin", 24),
        ("role:admin", 2, "settings", 16),
    ]
    assert items[0]["updated_by"] == "someone"
    assert items[0]["updated_at"].endswith("Z")
    assert items[1]["updated_by"] is None


async def test_put_then_get_records_the_acting_admin(setup: Any) -> None:
    app, client, auth = setup
    me = await (await client.get("/api/v1/me", headers=auth)).json()
    resp = await client.put(f"{WEIGHTS}/role:user", json={"weight": 5}, headers=auth)
    assert resp.status == 200, await resp.text()
    item = await resp.json()
    assert item["key"] == "role:user"
    assert (item["weight"], item["source"], item["window"]) == (5, "admin", 40)
    assert item["updated_by"] == me["id"]
    assert item["updated_at"] is not None

    # Over the settings' weight of the same key, then changed again.
    resp = await client.put(f"{WEIGHTS}/alice", json={"weight": 1}, headers=auth)
    assert resp.status == 200, await resp.text()
    resp = await client.put(f"{WEIGHTS}/alice", json={"weight": 2.0}, headers=auth)
    assert (await resp.json())["weight"] == 2

    listed = (await (await client.get(WEIGHTS, headers=auth)).json())["items"]
    assert [(i["key"], i["weight"], i["source"]) for i in listed] == [
        ("alice", 2, "admin"),
        ("role:admin", 2, "settings"),
        ("role:user", 5, "admin"),
    ]
    assert listed[2] == item
    # What the relays read.
    assert await fairness.stored_weights(app[CONTEXT]) == {"alice": 2, "role:user": 5}


async def test_put_refuses_bad_keys_and_weights(setup: Any) -> None:
    app, client, auth = setup
    for bad_key in ("role:Admin", "a.b", "x" * 65):
        resp = await client.put(f"{WEIGHTS}/{bad_key}", json={"weight": 2}, headers=auth)
        assert resp.status == 422, bad_key
        assert resp.content_type == "application/problem+json"
        problem = await resp.json()
        assert repr(bad_key) in problem["detail"]
        assert problem["errors"][0]["field"] == "key"
    for bad_body in (
        {"weight": 0},
        {"weight": 1001},
        {"weight": "2"},
        {"weight": 2.5},
        {"weight": 2, "other": 1},
        {},
    ):
        resp = await client.put(f"{WEIGHTS}/alice", json=bad_body, headers=auth)
        assert resp.status == 422, bad_body
        assert resp.content_type == "application/problem+json"
    assert await fairness.stored_weights(app[CONTEXT]) == {}


async def test_delete_then_404(setup: Any) -> None:
    _, client, auth = setup
    resp = await client.put(f"{WEIGHTS}/alice", json={"weight": 9}, headers=auth)
    assert resp.status == 200, await resp.text()

    resp = await client.delete(f"{WEIGHTS}/alice", headers=auth)
    assert resp.status == 204, await resp.text()
    # The settings' weight applies again, and cannot be deleted here.
    items = (await (await client.get(WEIGHTS, headers=auth)).json())["items"]
    assert items[0] == _settings_item("alice", 4)
    resp = await client.delete(f"{WEIGHTS}/alice", headers=auth)
    assert resp.status == 404
    assert resp.content_type == "application/problem+json"
    assert "FAIR_SHARE_WEIGHTS" in (await resp.json())["detail"]

    resp = await client.delete(f"{WEIGHTS}/nobody", headers=auth)
    assert resp.status == 404
    assert "FAIR_SHARE_WEIGHTS" not in (await resp.json())["detail"]


async def test_share_weights_are_for_admins(setup: Any) -> None:
    app, client, _ = setup
    user = bearer((await register(client, "someone@example.com"))["access_token"])
    for method, path, body in (
        ("GET", WEIGHTS, None),
        ("PUT", f"{WEIGHTS}/alice", {"weight": 3}),
        ("DELETE", f"{WEIGHTS}/alice", None),
    ):
        resp = await client.request(method, path, json=body, headers=user)
        assert resp.status == 403, (method, path)
        resp = await client.request(method, path, json=body)
        assert resp.status == 401, (method, path)
    assert await fairness.stored_weights(app[CONTEXT]) == {}
