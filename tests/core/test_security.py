"""Token verification and its cache of verified tokens."""

from __future__ import annotations

import time
from typing import Any

import pytest

from core.errors import Unauthorized
from core.security import Tokens


def test_a_verified_token_is_served_from_the_cache_until_it_expires(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = Tokens(settings)
    claims = tokens.issue("access", subject="u1", login_id="l1", role="user")
    token = tokens.encode(claims)
    calls = 0
    verify = tokens._verify

    def counting(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        return verify(*args)

    monkeypatch.setattr(tokens, "_verify", counting)
    assert tokens.decode(token, "access") == tokens.decode(token, "access") == claims
    assert calls == 1
    # The cache never turns an access token into a refresh token...
    with pytest.raises(Unauthorized):
        tokens.decode(token, "refresh")
    assert calls == 2
    # ...and never serves a token past its expiry: it is verified again (PyJWT then judges
    # the expiry by its own clock).
    monkeypatch.setattr(time, "time", lambda: claims.expires_at + 60)
    tokens.decode(token, "access")
    assert calls == 3


def test_the_cache_is_bounded(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("core.security.VERIFIED_CACHE_SIZE", 3)
    tokens = Tokens(settings)
    issued = [
        tokens.encode(tokens.issue("access", subject=f"u{i}", login_id="l", role="user"))
        for i in range(5)
    ]
    for token in issued:
        tokens.decode(token, "access")
    assert len(tokens._verified) == 3
    assert list(tokens._verified) == issued[2:]
