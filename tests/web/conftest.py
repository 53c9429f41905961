"""Fixtures shared by the admin endpoint tests (tests/web/test_admin_*.py): the app with an
admin account, a test client and that admin's bearer header."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import bearer
from web.app import create_app

#: The admin account the app is started with.
ADMIN = {"email": "root@example.com", "password": "admin password 1"}


@pytest.fixture
async def setup(make_settings: Any, aiohttp_client: Any) -> tuple[Any, Any, dict[str, str]]:
    """The app (started with :data:`ADMIN`), its test client and the admin's bearer header."""
    settings = make_settings(admin_email=ADMIN["email"], admin_password=ADMIN["password"])
    app = create_app(settings)
    client = await aiohttp_client(app)
    resp = await client.post("/api/v1/auth/login", json=ADMIN)
    assert resp.status == 200, await resp.text()
    return app, client, bearer((await resp.json())["access_token"])
