"""``taskmanager admin create``: creates an admin; promotes an existing account only when
told to (``--promote-existing``), replacing its password."""

from __future__ import annotations

import asyncio
from typing import Any

from click.testing import CliRunner

from cli.main import main
from tests.conftest import bearer, register


async def admin_create(*args: str) -> Any:
    return await asyncio.to_thread(CliRunner().invoke, main, ["admin", "create", *args])


async def test_admin_create_then_promote(ctx: Any, client: Any, cli_env: Any) -> None:
    result = await admin_create("--email", "Root@Example.com", "--password", "admin password 1")
    assert result.exit_code == 0, result.output
    assert "\ncreated admin root@example.com (id " in "\n" + result.output
    login = await client.post(
        "/api/v1/auth/login", json={"email": "root@example.com", "password": "admin password 1"}
    )
    assert (await login.json())["user"]["role"] == "admin"

    await register(client, "ann@example.com", password="ann password 1")
    # An existing account is not touched without --promote-existing.
    result = await admin_create("--email", "ann@example.com", "--password", "operator pass 1")
    assert result.exit_code == 1, result.output
    assert "already exists" in result.output and "--promote-existing" in result.output
    assert (await ctx.store["users"].find_one({"email": "ann@example.com"}))["role"] == "user"

    result = await admin_create(
        "--email", "ann@example.com", "--password", "operator pass 1", "--promote-existing"
    )
    assert result.exit_code == 0, result.output
    assert "\npromoted admin ann@example.com (id " in "\n" + result.output
    # Promotion sets the operator's password: the account's own no longer works.
    login = await client.post(
        "/api/v1/auth/login", json={"email": "ann@example.com", "password": "ann password 1"}
    )
    assert login.status == 401
    login = await client.post(
        "/api/v1/auth/login", json={"email": "ann@example.com", "password": "operator pass 1"}
    )
    assert (await login.json())["user"]["role"] == "admin"


async def test_admin_create_refuses_a_malformed_email(cli_env: Any) -> None:
    result = await admin_create("--email", "not-an-email", "--password", "admin password 1")
    assert result.exit_code == 2, result.output
    assert "--email" in result.output and "not a valid email address" in result.output
    assert "Traceback" not in result.output


async def test_admin_create_refuses_a_short_password(cli_env: Any) -> None:
    result = await admin_create("--email", "x@example.com", "--password", "short")
    assert result.exit_code == 2
    assert "at least 8 characters" in result.output


async def test_admin_revoke_sessions(ctx: Any, client: Any, cli_env: Any) -> None:
    ann = await register(client, "ann@example.com", password="ann password 1")
    result = await asyncio.to_thread(
        CliRunner().invoke, main, ["admin", "revoke-sessions", "--email", "Ann@Example.com"]
    )
    assert result.exit_code == 0, result.output
    assert "revoked 1 login(s) of ann@example.com" in result.output
    resp = await client.get("/api/v1/me", headers=bearer(ann["access_token"]))
    assert resp.status == 401

    by_id = await asyncio.to_thread(
        CliRunner().invoke, main, ["admin", "revoke-sessions", "--user-id", ann["user"]["id"]]
    )
    assert by_id.exit_code == 0 and "revoked 0 login(s)" in by_id.output
    unknown = await asyncio.to_thread(
        CliRunner().invoke, main, ["admin", "revoke-sessions", "--email", "nobody@example.com"]
    )
    assert unknown.exit_code == 1 and "No account with email" in unknown.output
