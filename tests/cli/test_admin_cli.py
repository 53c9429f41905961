"""``taskmanager admin create``: creates an admin, or promotes an existing account."""

from __future__ import annotations

import asyncio
from typing import Any

from click.testing import CliRunner

from cli.main import main
from tests.cli.test_reindex import env  # noqa: F401  (the settings-as-environment fixture)
from tests.conftest import register


async def admin_create(*args: str) -> Any:
    return await asyncio.to_thread(CliRunner().invoke, main, ["admin", "create", *args])


async def test_admin_create_then_promote(ctx: Any, client: Any, env: None) -> None:  # noqa: F811
    result = await admin_create("--email", "Root@Example.com", "--password", "admin password 1")
    assert result.exit_code == 0, result.output
    assert "\ncreated admin root@example.com (id " in "\n" + result.output
    login = await client.post(
        "/api/v1/auth/login", json={"email": "root@example.com", "password": "admin password 1"}
    )
    assert (await login.json())["user"]["role"] == "admin"

    await register(client, "ann@example.com", password="ann password 1")
    result = await admin_create("--email", "ann@example.com", "--password", "ignored pass 1")
    assert result.exit_code == 0, result.output
    assert "\npromoted admin ann@example.com (id " in "\n" + result.output
    # Promotion keeps the account's own password.
    login = await client.post(
        "/api/v1/auth/login", json={"email": "ann@example.com", "password": "ann password 1"}
    )
    assert (await login.json())["user"]["role"] == "admin"


async def test_admin_create_refuses_a_short_password(env: None) -> None:  # noqa: F811
    result = await admin_create("--email", "x@example.com", "--password", "short")
    assert result.exit_code == 2
    assert "at least 8 characters" in result.output
