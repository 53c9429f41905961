"""Ending sessions (issue 7): a demoted admin loses admin at once, not when the token
expires; an admin can end every login of a user, whose tokens then stop working at once."""

from __future__ import annotations

from typing import Any

import pytest
from bson import ObjectId

from tests.conftest import bearer, register

ADMIN = {"email": "root@example.com", "password": "admin password 1"}


@pytest.fixture
async def admin_client(make_settings: Any, aiohttp_client: Any) -> Any:
    from web.app import create_app

    settings = make_settings(admin_email=ADMIN["email"], admin_password=ADMIN["password"])
    return await aiohttp_client(create_app(settings))


async def sign_in(client: Any, email: str, password: str) -> dict[str, Any]:
    resp = await client.post("/api/v1/auth/login", json={"email": email, "password": password})
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


def revoke_url(user_id: str) -> str:
    return f"/api/v1/admin/users/{user_id}/revoke-sessions"


async def test_a_demoted_admin_loses_admin_at_once(admin_client: Any) -> None:
    from web.keys import CONTEXT

    admin = await sign_in(admin_client, ADMIN["email"], ADMIN["password"])
    auth = bearer(admin["access_token"])
    assert (await admin_client.get("/api/v1/admin/workers", headers=auth)).status == 200

    store = admin_client.app[CONTEXT].store
    await store["users"].update_one(
        {"_id": ObjectId(admin["user"]["id"])}, {"$set": {"role": "user"}}
    )
    # The token still says "admin"; the store no longer does.
    resp = await admin_client.get("/api/v1/admin/workers", headers=auth)
    assert resp.status == 403, await resp.text()
    resp = await admin_client.post(revoke_url(admin["user"]["id"]), headers=auth)
    assert resp.status == 403

    await store["users"].delete_one({"_id": ObjectId(admin["user"]["id"])})
    assert (await admin_client.get("/api/v1/admin/workers", headers=auth)).status == 403


async def test_admin_revokes_every_login_of_a_user(admin_client: Any) -> None:
    admin = await sign_in(admin_client, ADMIN["email"], ADMIN["password"])
    victim = await register(admin_client, "ann@example.com", password="ann password 1")
    other_login = await sign_in(admin_client, "ann@example.com", "ann password 1")
    bystander = await register(admin_client, "bob@example.com", password="bob password 1")

    # Only an admin may.
    resp = await admin_client.post(
        revoke_url(victim["user"]["id"]), headers=bearer(bystander["access_token"])
    )
    assert resp.status == 403

    resp = await admin_client.post(
        revoke_url(victim["user"]["id"]), headers=bearer(admin["access_token"])
    )
    assert resp.status == 204, await resp.text()

    for pair in (victim, other_login):
        resp = await admin_client.get("/api/v1/me", headers=bearer(pair["access_token"]))
        assert resp.status == 401  # at once, not after the access token's 15 minutes
        resp = await admin_client.post(
            "/api/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]}
        )
        assert resp.status == 401
    # Others are untouched, and the user can sign in again.
    resp = await admin_client.get("/api/v1/me", headers=bearer(bystander["access_token"]))
    assert resp.status == 200
    fresh = await sign_in(admin_client, "ann@example.com", "ann password 1")
    resp = await admin_client.get("/api/v1/me", headers=bearer(fresh["access_token"]))
    assert resp.status == 200


async def test_revoking_an_unknown_user_is_404(admin_client: Any) -> None:
    admin = await sign_in(admin_client, ADMIN["email"], ADMIN["password"])
    for user_id in (str(ObjectId()), "not-an-id"):
        resp = await admin_client.post(revoke_url(user_id), headers=bearer(admin["access_token"]))
        assert resp.status == 404
        assert resp.content_type == "application/problem+json"
