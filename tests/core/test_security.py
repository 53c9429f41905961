"""Token verification and its cache of verified tokens."""

from __future__ import annotations

import time
from typing import Any

import pytest

from core.errors import Unauthorized
from core.security import Tokens, Unsealable, seal, unseal


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


def test_a_sealed_value_opens_only_with_its_key_for_its_record() -> None:
    key, other = b"k" * 32, b"o" * 32
    sealed = seal(key, b"the secret", "record-1")
    assert b"the secret" not in sealed
    assert seal(key, b"the secret", "record-1") != sealed  # a new nonce each time
    assert unseal(key, sealed, "record-1") == b"the secret"
    for wrong_key, record, raw in (
        (other, "record-1", sealed),  # JWT_SECRET changed
        (key, "record-2", sealed),  # copied onto another record
        (key, "record-1", sealed[:-1] + bytes([sealed[-1] ^ 1])),  # altered
        (key, "record-1", sealed[:8]),  # cut short
    ):
        with pytest.raises(Unsealable):
            unseal(wrong_key, raw, record)
