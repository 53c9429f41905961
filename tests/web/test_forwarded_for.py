"""Client address behind trusted proxies (X-Forwarded-For)."""

from __future__ import annotations

from typing import Any

from web.app import create_app


async def _login_failures_until_429(client: Any, headers: dict[str, str]) -> int:
    for attempt in range(1, 10):
        resp = await client.post(
            "/api/v1/auth/login",
            json={"email": f"x{attempt}@example.com", "password": "nope"},
            headers=headers,
        )
        if resp.status == 429:
            return attempt
    return 0


async def test_forwarded_for_is_believed_only_from_trusted_proxies(
    make_settings: Any, aiohttp_client: Any
) -> None:
    settings = make_settings(login_max_failures_per_address=2, trusted_proxies="127.0.0.0/8")
    client = await aiohttp_client(create_app(settings))
    # Two clients behind the proxy have separate per-address budgets...
    assert await _login_failures_until_429(client, {"X-Forwarded-For": "203.0.113.5"}) == 3
    assert await _login_failures_until_429(client, {"X-Forwarded-For": "203.0.113.6"}) == 3
    # ...and a client cannot escape by prepending a forged hop: the right-most untrusted wins.
    forged = {"X-Forwarded-For": "198.51.100.1, 203.0.113.5"}
    assert await _login_failures_until_429(client, forged) == 1


async def test_forwarded_for_is_ignored_without_trusted_proxies(
    make_settings: Any, aiohttp_client: Any
) -> None:
    client = await aiohttp_client(create_app(make_settings(login_max_failures_per_address=2)))
    assert await _login_failures_until_429(client, {"X-Forwarded-For": "203.0.113.5"}) == 3
    # A different forwarded address is still the same socket peer: already throttled.
    assert await _login_failures_until_429(client, {"X-Forwarded-For": "203.0.113.9"}) == 1
