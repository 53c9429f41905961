"""Pre-registering the operator's email must not make the attacker admin (issue 7).

The attacker registers ``ADMIN_EMAIL`` (or the address an operator is about to pass to
``taskmanager admin create``) before the operator does. Neither the command nor the start-up
bootstrap may promote that account keeping its password; ``--promote-existing`` takes the
account over: the operator's password replaces the attacker's and every session ends.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from click.testing import CliRunner, Result

from cli.main import main
from core import accounts
from tests.conftest import bearer, register

EMAIL = "ops@example.com"
ATTACKER_PASSWORD = "attacker pass 1"
OPERATOR_PASSWORD = "operator pass 1"


async def admin_create(*args: str) -> Result:
    return await asyncio.to_thread(
        CliRunner().invoke,
        main,
        ["admin", "create", "--email", EMAIL, "--password", OPERATOR_PASSWORD, *args],
    )


async def login(client: Any, password: str) -> Any:
    return await client.post("/api/v1/auth/login", json={"email": EMAIL, "password": password})


@pytest.fixture
async def attacker(ctx: Any, client: Any, cli_env: Any) -> Any:
    """Whoever registered the operator's address first (their token pair)."""
    return await register(client, EMAIL, password=ATTACKER_PASSWORD)


async def test_admin_create_refuses_an_existing_account(client: Any, attacker: Any) -> None:
    result = await admin_create()
    assert result.exit_code == 1, result.output
    assert "already exists" in result.output and "--promote-existing" in result.output
    # Nothing changed: still a plain user, whose sign-in says so.
    resp = await login(client, ATTACKER_PASSWORD)
    assert (await resp.json())["user"]["role"] == "user"
    assert (await login(client, OPERATOR_PASSWORD)).status == 401
    resp = await client.get("/api/v1/admin/workers", headers=bearer(attacker["access_token"]))
    assert resp.status == 403


async def test_promote_existing_takes_the_account_over(client: Any, attacker: Any) -> None:
    resp = await login(client, ATTACKER_PASSWORD)
    second = await resp.json()

    result = await admin_create("--promote-existing")
    assert result.exit_code == 0, result.output
    assert "promoted admin ops@example.com" in result.output

    # The attacker's password no longer works, nor do any of their sessions.
    assert (await login(client, ATTACKER_PASSWORD)).status == 401
    for pair in (attacker, second):
        resp = await client.get("/api/v1/me", headers=bearer(pair["access_token"]))
        assert resp.status == 401, await resp.text()
        resp = await client.post(
            "/api/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]}
        )
        assert resp.status == 401
    # The operator signs in as admin.
    resp = await login(client, OPERATOR_PASSWORD)
    assert resp.status == 200
    operator = await resp.json()
    assert operator["user"]["role"] == "admin"
    resp = await client.get("/api/v1/admin/workers", headers=bearer(operator["access_token"]))
    assert resp.status == 200


async def test_bootstrap_never_promotes_an_account_it_did_not_create(
    make_settings: Any, aiohttp_client: Any
) -> None:
    from web.app import create_app

    first = await aiohttp_client(create_app(make_settings()))
    attacker = await register(first, EMAIL, password=ATTACKER_PASSWORD)
    await first.close()

    # The deployment starts with ADMIN_EMAIL set to the address the attacker registered.
    settings = make_settings(admin_email=EMAIL, admin_password=OPERATOR_PASSWORD)
    client = await aiohttp_client(create_app(settings))  # starts: a warning, no promotion
    resp = await login(client, ATTACKER_PASSWORD)
    assert resp.status == 200
    assert (await resp.json())["user"]["role"] == "user"
    assert (await login(client, OPERATOR_PASSWORD)).status == 401
    resp = await client.get("/api/v1/admin/workers", headers=bearer(attacker["access_token"]))
    assert resp.status == 403
    await client.close()

    # A second start changes nothing either; an admin it created itself is left alone.
    client = await aiohttp_client(create_app(settings))
    resp = await login(client, ATTACKER_PASSWORD)
    assert (await resp.json())["user"]["role"] == "user"


async def test_bootstrap_creates_then_keeps_its_admin(
    make_settings: Any, aiohttp_client: Any
) -> None:
    from web.app import create_app

    settings = make_settings(admin_email=EMAIL, admin_password=OPERATOR_PASSWORD)
    for _ in range(2):  # created on the first start, found (unchanged) on the next
        client = await aiohttp_client(create_app(settings))
        resp = await login(client, OPERATOR_PASSWORD)
        assert resp.status == 200
        assert (await resp.json())["user"]["role"] == "admin"
        await client.close()


async def test_ensure_admin_leaves_an_existing_account_alone(ctx: Any) -> None:
    user = await accounts.create_user(ctx, EMAIL, ATTACKER_PASSWORD, "Mallory")
    found, outcome = await accounts.ensure_admin(ctx, EMAIL.upper(), OPERATOR_PASSWORD)
    assert outcome == "exists" and found["_id"] == user["_id"]
    stored = await ctx.store["users"].find_one({"_id": user["_id"]})
    assert stored["role"] == "user" and stored["password_hash"] == user["password_hash"]
