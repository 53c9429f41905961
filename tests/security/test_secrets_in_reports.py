"""Issue 7: passwords and tokens never reach Sentry or the console log.

The attack: a request carrying a password (and a bearer token, a cookie, a refresh token)
fails inside the server. Before the fix Sentry's event held every frame's local variables
(``LoginIn(... password=...)``) and the raw body, and the console log's Rich traceback
printed the locals (``raw = b'{"email":...,"password":...}'``).

Sentry events really leave the process, to the loopback receiver of tests/config/test_sentry.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

import core.accounts
from config.logging import get_logger
from config.sentry import FILTERED, scrub, setup_sentry
from tests.config.logs import captured_logs
from tests.config.test_sentry import Receiver, receiver  # noqa: F401  (the fixture)
from web.app import create_app

pytestmark = pytest.mark.timeout(90)

PASSWORD = "hunter2-Pa55word-7f3a"
REFRESH = "refresh-0b8c1d2e3f"
BEARER = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXh5eg"
COOKIE = "session-cookie-91ab"
SECRETS = (PASSWORD, REFRESH, BEARER, COOKIE, "c2lnbmF0dXJlLXh5eg")


async def test_failing_login_sends_no_secret_to_sentry(
    receiver: Receiver,  # noqa: F811
    make_settings: Any,
    aiohttp_client: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = make_settings(sentry_dsn=receiver.dsn, log_format="json")
    log = get_logger("test.login")

    async def broken_login(ctx: Any, body: core.accounts.LoginIn, **kwargs: Any) -> Any:
        password = body.password
        # A log line with a secret field becomes a breadcrumb; the error text quotes the body.
        log.warning("login.trouble", refresh_token=REFRESH, password=password)
        raise RuntimeError(f"store exploded for {body!r} with token={REFRESH}")

    monkeypatch.setattr(core.accounts, "login", broken_login)
    with captured_logs(settings, process="web"):
        assert setup_sentry(settings, process="web")
        client = await aiohttp_client(create_app(settings))
        resp = await client.post(
            "/api/v1/auth/login",
            json={"email": "ann@example.com", "password": PASSWORD},
            headers={
                "Authorization": f"Bearer {BEARER}",
                "Cookie": f"session={COOKIE}",
                "X-Request-ID": "leak-1",
            },
        )
        assert resp.status == 500
        event = await receiver.wait_for_error(
            lambda e: e["exception"]["values"][-1]["type"] == "RuntimeError"
        )
    # The event is still useful: the error, where it happened, the request.
    exc = event["exception"]["values"][-1]
    assert "store exploded" in exc["value"]
    assert any(f["function"] == "broken_login" for f in exc["stacktrace"]["frames"])
    assert event["tags"]["request_id"] == "leak-1"
    assert all("vars" not in f for f in exc["stacktrace"]["frames"])
    assert "data" not in event.get("request", {})
    # ...and holds no secret anywhere, whatever was sent in the envelope.
    everything = json.dumps(receiver.envelopes)
    for secret in SECRETS:
        assert secret not in everything, secret


def test_scrub_blanks_secret_keys_and_secrets_in_text() -> None:
    event = {
        "extra": {"password": "p1", "new_password": "p2", "count": 3, "note": None},
        "request": {"headers": {"Authorization": "Bearer abc", "X-Api-Key": "k", "Accept": "x"}},
        "breadcrumbs": {"values": [{"data": {"access_token": "t1", "jwt": "j"}}]},
        "message": 'body b\'{"email":"a@b.co","password":"p3"}\' and Authorization: Bearer t2',
        "other": "input_value='p4', input_type=str; refresh_token=t3&x=1",
    }
    out = scrub(event)
    text = json.dumps(out)
    for secret in ("p1", "p2", "p3", "p4", "abc", "t1", "t2", "t3", '"j"', '"k"'):
        assert secret not in text, secret
    assert out["extra"]["password"] == FILTERED
    assert out["extra"]["count"] == 3
    assert out["request"]["headers"]["Accept"] == "x"
    assert "a@b.co" in out["message"]


def test_console_traceback_prints_no_local_variables(make_settings: Any) -> None:
    def check(raw: bytes) -> None:
        password = json.loads(raw)["password"]
        raise ValueError(f"cannot check a password of {len(password)} characters")

    with captured_logs(make_settings(log_format="console"), process="run"):
        import logging

        [handler] = logging.getLogger().handlers
        try:
            check(json.dumps({"email": "ann@example.com", "password": PASSWORD}).encode())
        except ValueError:
            get_logger("test.console").exception("login.failed")
        output = handler.stream.getvalue()  # type: ignore[attr-defined]
    assert "login.failed" in output
    assert "cannot check a password of" in output  # the traceback is there
    assert "check" in output
    assert PASSWORD not in output
