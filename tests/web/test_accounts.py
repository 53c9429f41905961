"""Accounts over HTTP against the real MongoDB test server and Redis."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest

from tests.conftest import TEST_SECRET, bearer, register

pytestmark = pytest.mark.timeout(90)


async def test_register_returns_user_and_tokens(client: Any) -> None:
    body = await register(client, "Ann@Example.com", name="Ann")
    assert body["user"]["email"] == "ann@example.com"
    assert body["user"]["role"] == "user"
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 900
    assert "password" not in json.dumps(body["user"])
    resp = await client.get("/api/v1/me", headers=bearer(body["access_token"]))
    assert resp.status == 200
    me = await resp.json()
    assert me["id"] == body["user"]["id"]
    assert me["created_at"].endswith("Z")


async def test_duplicate_email_is_409_problem(client: Any) -> None:
    await register(client, "dup@example.com")
    resp = await client.post(
        "/api/v1/auth/register",
        json={"email": "DUP@example.com", "password": "another pass 1", "name": "B"},
    )
    assert resp.status == 409
    assert resp.content_type == "application/problem+json"
    problem = await resp.json()
    assert problem["status"] == 409
    assert problem["title"] == "Conflict"


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"email": {"$gt": ""}, "password": "longenough", "name": "A"}, "email"),
        ({"email": "a@example.com", "password": {"$ne": None}, "name": "A"}, "password"),
        (
            {"email": "a@example.com", "password": "longenough", "name": "A", "role": "admin"},
            "role",
        ),
        ({"email": "not-an-email", "password": "longenough", "name": "A"}, "email"),
        ({"email": "a@example.com", "password": "short", "name": "A"}, "password"),
        ({"email": "a@example.com", "password": "longenough", "name": 5}, "name"),
        ({"email": "a@example.com", "password": "longenough"}, "name"),
    ],
)
async def test_register_rejects_bad_input(client: Any, payload: dict[str, Any], field: str) -> None:
    resp = await client.post("/api/v1/auth/register", json=payload)
    assert resp.status == 422
    assert resp.content_type == "application/problem+json"
    problem = await resp.json()
    assert field in [e["field"] for e in problem["errors"]]
    assert "Traceback" not in json.dumps(problem)


async def test_login_operator_injection_is_422(client: Any) -> None:
    await register(client, "victim@example.com")
    resp = await client.post(
        "/api/v1/auth/login", json={"email": "victim@example.com", "password": {"$gt": ""}}
    )
    assert resp.status == 422
    problem = await resp.json()
    assert problem["errors"][0]["field"] == "password"


async def test_malformed_json_is_400_problem(client: Any) -> None:
    resp = await client.post(
        "/api/v1/auth/login", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert resp.status == 400
    assert resp.content_type == "application/problem+json"


async def test_body_too_large_is_413(make_settings: Any, aiohttp_client: Any) -> None:
    from web.app import create_app

    client = await aiohttp_client(create_app(make_settings(max_body_size=2048)))
    resp = await client.post("/api/v1/auth/login", json={"email": "a@b.co", "password": "x" * 5000})
    assert resp.status == 413
    assert resp.content_type == "application/problem+json"


async def test_login_refresh_logout_flow(client: Any) -> None:
    await register(client, "flow@example.com", password="flow password 1")
    resp = await client.post(
        "/api/v1/auth/login", json={"email": "flow@example.com", "password": "flow password 1"}
    )
    assert resp.status == 200
    pair = await resp.json()
    resp = await client.post("/api/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]})
    assert resp.status == 200
    pair2 = await resp.json()
    assert pair2["refresh_token"] != pair["refresh_token"]
    assert (await client.get("/api/v1/me", headers=bearer(pair2["access_token"]))).status == 200

    resp = await client.post("/api/v1/auth/logout", headers=bearer(pair2["access_token"]))
    assert resp.status == 204
    # The access token dies at once, and so does the login's refresh token.
    resp = await client.get("/api/v1/me", headers=bearer(pair2["access_token"]))
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    resp = await client.post("/api/v1/auth/refresh", json={"refresh_token": pair2["refresh_token"]})
    assert resp.status == 401


async def test_reused_refresh_token_revokes_the_login(client: Any) -> None:
    pair = await register(client)
    first = await (
        await client.post("/api/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]})
    ).json()
    # An attacker replays the original (already rotated) refresh token.
    resp = await client.post("/api/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]})
    assert resp.status == 401
    assert "already used" in (await resp.json())["detail"]
    # Every token of that login is now dead: the newest refresh token and the access tokens.
    resp = await client.post("/api/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert resp.status == 401
    for token in (first["access_token"], pair["access_token"]):
        assert (await client.get("/api/v1/me", headers=bearer(token))).status == 401


async def test_other_logins_survive_a_revocation(client: Any) -> None:
    pair = await register(client, "two@example.com", password="two logins 1")
    other = await (
        await client.post(
            "/api/v1/auth/login", json={"email": "two@example.com", "password": "two logins 1"}
        )
    ).json()
    await client.post("/api/v1/auth/logout", headers=bearer(pair["access_token"]))
    assert (await client.get("/api/v1/me", headers=bearer(other["access_token"]))).status == 200


def _forge(
    claims: dict[str, Any], *, key: str = TEST_SECRET, alg: str = "HS256", typ: str = "at+jwt"
) -> str:
    return jwt.encode(claims, key, algorithm=alg, headers={"typ": typ})


def _claims_of(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


async def test_forged_tokens_are_401_with_www_authenticate(client: Any) -> None:
    pair = await register(client)
    good = _claims_of(pair["access_token"])
    now = int(time.time())
    header, payload, signature = pair["access_token"].split(".")
    tampered = _b64({**good, "role": "admin"})
    forged = {
        "alg none": f"{_b64({'alg': 'none', 'typ': 'at+jwt'})}.{payload}.",
        "tampered claims": f"{header}.{tampered}.{signature}",
        "wrong key": _forge(good, key="another-secret-" + "y" * 40),
        "expired": _forge({**good, "iat": now - 7200, "nbf": now - 7200, "exp": now - 3600}),
        "wrong audience": _forge({**good, "aud": "someone-else"}),
        "wrong issuer": _forge({**good, "iss": "evil"}),
        "refresh used as access": pair["refresh_token"],
        "access typ but refresh claim": _forge({**good, "type": "refresh"}),
        "no exp": _forge({k: v for k, v in good.items() if k != "exp"}),
        "garbage": "not-a-jwt",
    }
    for label, token in forged.items():
        resp = await client.get("/api/v1/me", headers=bearer(token))
        assert resp.status == 401, label
        assert resp.headers["WWW-Authenticate"].startswith('Bearer realm="taskmanager"'), label
        assert resp.content_type == "application/problem+json", label
    # ...and the genuine token still works, so the 401s above are about the forgeries.
    assert (await client.get("/api/v1/me", headers=bearer(pair["access_token"]))).status == 200


async def test_access_token_cannot_refresh(client: Any) -> None:
    pair = await register(client)
    resp = await client.post("/api/v1/auth/refresh", json={"refresh_token": pair["access_token"]})
    assert resp.status == 401


async def test_missing_auth_header_is_401(client: Any) -> None:
    resp = await client.get("/api/v1/me")
    assert resp.status == 401
    assert 'error="invalid_request"' in resp.headers["WWW-Authenticate"]


async def test_login_does_not_reveal_whether_email_exists(client: Any) -> None:
    await register(client, "known@example.com", password="right password 1")
    known = await client.post(
        "/api/v1/auth/login", json={"email": "known@example.com", "password": "wrong password"}
    )
    unknown = await client.post(
        "/api/v1/auth/login", json={"email": "nobody@example.com", "password": "wrong password"}
    )
    assert known.status == unknown.status == 401
    a, b = await known.json(), await unknown.json()
    for k in ("type", "title", "status", "detail"):
        assert a[k] == b[k]
    assert known.headers["WWW-Authenticate"] == unknown.headers["WWW-Authenticate"]


async def test_unknown_accounts_cost_one_password_verification_too(
    client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Equal timing by construction: a login for an unknown email still runs exactly one
    argon2 verification (against a dummy hash), like a wrong password for a known one. (A
    wall-clock comparison would be a timed test, flaky on a loaded machine.)"""
    from core import security

    await register(client, "timing@example.com", password="right password 1")
    verified: list[str] = []
    real = security._hasher

    class Counting:
        def verify(self, stored: str, password: str) -> bool:
            verified.append(stored)
            return real.verify(stored, password)

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    monkeypatch.setattr(security, "_hasher", Counting())
    for email in ("timing@example.com", "ghost@example.com"):
        resp = await client.post("/api/v1/auth/login", json={"email": email, "password": "wrong"})
        assert resp.status == 401
    assert len(verified) == 2
    assert verified[1] == security._DUMMY_HASH
    assert verified[0] != security._DUMMY_HASH
    assert all(h.startswith("$argon2id$v=19$m=19456,t=2,p=1$") for h in verified)


async def test_failed_logins_are_throttled_per_account_and_address(
    make_settings: Any, aiohttp_client: Any
) -> None:
    """The same address failing on one account is refused (the whole account never is: see
    tests/security/test_login_throttle.py)."""
    from web.app import create_app

    client = await aiohttp_client(create_app(make_settings(login_max_failures=3)))
    await register(client, "target@example.com", password="real password 1")
    for _ in range(3):
        resp = await client.post(
            "/api/v1/auth/login", json={"email": "target@example.com", "password": "guess"}
        )
        assert resp.status == 401
    resp = await client.post(
        "/api/v1/auth/login", json={"email": "target@example.com", "password": "real password 1"}
    )
    assert resp.status == 429
    assert int(resp.headers["Retry-After"]) > 0
    # Unknown accounts are throttled the same way: nothing leaks through the 429 either.
    for _ in range(3):
        await client.post(
            "/api/v1/auth/login", json={"email": "ghost@example.com", "password": "guess"}
        )
    resp = await client.post(
        "/api/v1/auth/login", json={"email": "ghost@example.com", "password": "guess"}
    )
    assert resp.status == 429


async def test_failed_logins_are_throttled_per_address(
    make_settings: Any, aiohttp_client: Any
) -> None:
    from web.app import create_app

    client = await aiohttp_client(create_app(make_settings(login_max_failures_per_address=4)))
    for i in range(4):
        resp = await client.post(
            "/api/v1/auth/login", json={"email": f"u{i}@example.com", "password": "guess"}
        )
        assert resp.status == 401
    resp = await client.post(
        "/api/v1/auth/login", json={"email": "fresh@example.com", "password": "guess"}
    )
    assert resp.status == 429


async def test_patch_me(client: Any) -> None:
    pair = await register(client)
    resp = await client.patch(
        "/api/v1/me",
        json={
            "name": "  Annie ",
            "notification_prefs": {"email_due_soon": False, "due_soon_window_hours": 6},
        },
        headers=bearer(pair["access_token"]),
    )
    assert resp.status == 200
    me = await resp.json()
    assert me["name"] == "Annie"
    assert me["notification_prefs"]["email_due_soon"] is False
    assert me["notification_prefs"]["due_soon_window_hours"] == 6
    assert me["notification_prefs"]["email_welcome"] is True
    resp = await client.patch(
        "/api/v1/me", json={"email": "x@example.com"}, headers=bearer(pair["access_token"])
    )
    assert resp.status == 422
    resp = await client.patch(
        "/api/v1/me",
        json={"notification_prefs": {"due_soon_window_hours": 0}},
        headers=bearer(pair["access_token"]),
    )
    assert resp.status == 422


async def test_admin_bootstrap_from_settings(make_settings: Any, aiohttp_client: Any) -> None:
    from web.app import create_app

    settings = make_settings(admin_email="root@example.com", admin_password="admin password 1")
    client = await aiohttp_client(create_app(settings))
    resp = await client.post(
        "/api/v1/auth/login", json={"email": "root@example.com", "password": "admin password 1"}
    )
    assert resp.status == 200
    assert (await resp.json())["user"]["role"] == "admin"
