"""Issue 7, "Anyone can lock any account": the lock-out attack replayed.

Before: five wrong passwords from five addresses made the right password answer 429 for 15
minutes, for everyone. Now failures are throttled per (account, address) and per address; for
the account as a whole attempts are slowed down, never refused (core.accounts.login).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from core import accounts
from core.accounts import LoginIn
from core.errors import Unauthorized
from tests.conftest import register
from web.app import create_app

pytestmark = pytest.mark.timeout(90)

LOGIN = "/api/v1/auth/login"
VICTIM = "victim@example.com"
SECRET = "victim's own passphrase"


async def _login(client: Any, email: str, password: str, address: str) -> Any:
    return await client.post(
        LOGIN,
        json={"email": email, "password": password},
        headers={"X-Forwarded-For": address},
    )


@pytest.fixture
async def proxied(make_settings: Any, aiohttp_client: Any) -> Any:
    """A client whose X-Forwarded-For is believed, so each request can come from anywhere."""
    return await aiohttp_client(create_app(make_settings(trusted_proxies="127.0.0.0/8")))


async def test_failures_from_many_addresses_do_not_lock_the_owner_out(
    proxied: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The account-wide slow-down is exercised below; here it is kept short. (raising=False:
    # replayed against the code before the fix, this test fails on the 429, not on a name.)
    monkeypatch.setattr(accounts, "SLOWDOWN_FIRST", 0.01, raising=False)
    monkeypatch.setattr(accounts, "SLOWDOWN_MAX", 0.02, raising=False)
    await register(proxied, VICTIM, password=SECRET)
    attackers = [f"203.0.113.{i}" for i in range(1, 6)]
    for address in attackers:
        for _ in range(5):
            assert (await _login(proxied, VICTIM, "guess", address)).status == 401
    # The owner, from an address that did nothing wrong, still signs in.
    resp = await _login(proxied, VICTIM, SECRET, "198.51.100.7")
    assert resp.status == 200, await resp.text()
    # The attackers' addresses are each refused for this account, with Retry-After...
    resp = await _login(proxied, VICTIM, "guess", attackers[0])
    assert resp.status == 429
    assert 0 < int(resp.headers["Retry-After"]) <= 900
    # ...even with the right password: the pair is throttled, not just wrong guesses.
    assert (await _login(proxied, VICTIM, SECRET, attackers[0])).status == 429


async def test_hammering_from_one_address_gets_429_for_known_and_unknown_alike(
    proxied: Any,
) -> None:
    await register(proxied, VICTIM, password=SECRET)
    answers = {}
    for email in (VICTIM, "ghost@example.com"):
        for _ in range(5):
            assert (await _login(proxied, email, "guess", "203.0.113.50")).status == 401
        resp = await _login(proxied, email, "guess", "203.0.113.50")
        assert resp.status == 429
        assert int(resp.headers["Retry-After"]) > 0
        body = await resp.json()
        answers[email] = (body["type"], body["title"], body["detail"])
    # No enumeration through the throttle: an unknown account is answered the same way.
    assert answers[VICTIM] == answers["ghost@example.com"]


async def test_one_address_is_limited_across_accounts(
    make_settings: Any, aiohttp_client: Any
) -> None:
    settings = make_settings(trusted_proxies="127.0.0.0/8", login_max_failures_per_address=6)
    client = await aiohttp_client(create_app(settings))
    for i in range(6):  # password spraying: one guess per account
        assert (await _login(client, f"u{i}@example.com", "guess", "203.0.113.9")).status == 401
    resp = await _login(client, "u99@example.com", "guess", "203.0.113.9")
    assert resp.status == 429
    assert int(resp.headers["Retry-After"]) > 0
    # Another address is not affected.
    assert (await _login(client, "u99@example.com", "guess", "203.0.113.10")).status == 401


async def test_failures_on_an_account_slow_its_sign_ins_down(
    proxied: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(accounts, "SLOWDOWN_FIRST", 0.6)
    monkeypatch.setattr(accounts, "SLOWDOWN_MAX", 0.6)
    await register(proxied, VICTIM, password=SECRET)
    for i in range(5):  # one failure from each of five addresses: no pair is throttled
        assert (await _login(proxied, VICTIM, "guess", f"203.0.113.{i + 1}")).status == 401
    started = time.monotonic()
    resp = await _login(proxied, VICTIM, SECRET, "198.51.100.7")
    assert resp.status == 200
    # A lower bound only: the wait happened (an upper bound would be a flaky timing test).
    assert time.monotonic() - started >= 0.6


def test_the_slow_down_doubles_up_to_its_cap() -> None:
    waits = [accounts._slowdown(n, 5) for n in range(0, 12)]
    assert waits[:5] == [0.0] * 5
    assert waits[5:9] == [0.25, 0.5, 1.0, 2.0]
    assert waits[9:] == [accounts.SLOWDOWN_MAX] * 3
    assert accounts._slowdown(10**9, 5) == accounts.SLOWDOWN_MAX


async def test_throttling_fails_open_without_redis(
    ctx: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    await accounts.create_user(ctx, VICTIM, SECRET, "Victim")
    # Nothing listens on port 1; no retries, so each refusal is immediate.
    dead = aioredis.Redis(host="127.0.0.1", port=1, retry=Retry(NoBackoff(), 0))
    monkeypatch.setattr(ctx, "redis", dead)
    try:
        for _ in range(8):  # never 429 while nothing can be counted
            with pytest.raises(Unauthorized):
                await accounts.login(
                    ctx, LoginIn(email=VICTIM, password="guess"), address="a", client="t"
                )
        pair = await accounts.login(
            ctx, LoginIn(email=VICTIM, password=SECRET), address="a", client="t"
        )
        assert pair.user.email == VICTIM
    finally:
        await dead.aclose()
