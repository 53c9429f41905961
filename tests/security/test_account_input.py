"""Issue 7, accounts: lookalike emails, control characters in names, the commonest passwords,
and an address registered in decomposed Unicode that could not sign in (core.account_rules)."""

from __future__ import annotations

import unicodedata
from typing import Any

import pytest

from tests.conftest import bearer, register

pytestmark = pytest.mark.timeout(90)

REGISTER = "/api/v1/auth/register"
LOGIN = "/api/v1/auth/login"
GOOD = {"email": "ann@example.com", "password": "correct horse 1", "name": "Ann"}


async def _refused(client: Any, field: str, **body: str) -> str:
    resp = await client.post(REGISTER, json={**GOOD, **body})
    assert resp.status == 422, await resp.text()
    assert resp.content_type == "application/problem+json"
    problem = await resp.json()
    errors = {e["field"]: e["message"] for e in problem["errors"]}
    assert list(errors) == [field]
    assert "Value error" not in errors[field]
    return errors[field]


@pytest.mark.parametrize(
    ("email", "says"),
    [
        ("\uff41\uff44\uff4d\uff49\uff4e@example.com", "U+FF41"),  # fullwidth "admin"
        ("\U0001d41a\U0001d41d\U0001d426\U0001d422\U0001d427@example.com", "U+1D41A"),  # bold
        ("\ufb01nance@example.com", "U+FB01"),  # the "fi" ligature
        ("\u0430dmin@example.com", "mixes scripts (Cyrillic, Latin) in its local part"),
        ("admin@\u0435xample.com", "mixes scripts (Cyrillic, Latin) in its domain"),
        ("p\u0430yp\u0430l@example.com", "mixes scripts"),
        ("adm\u03b9n@example.com", "mixes scripts (Greek, Latin)"),  # Greek iota
    ],
)
async def test_lookalike_emails_are_refused(client: Any, email: str, says: str) -> None:
    assert says in await _refused(client, "email", email=email)


@pytest.mark.parametrize(
    "email",
    [
        "jos\u00e9@b\u00fccher.de",  # Latin with accents
        "\u0438\u0432\u0430\u043d@\u043f\u0440\u0438\u043c\u0435\u0440.\u0440\u0444",  # Cyrillic
        "\u5c71\u7530@\u4f8b\u3048.jp",  # Japanese: Han + Hiragana + Latin TLD
        "ann+tasks-2024@example.com",
    ],
)
async def test_addresses_in_one_script_are_accepted(client: Any, email: str) -> None:
    await register(client, email)


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("A\x00nn", "U+0000"),
        ("Ann\u202egnp.exe", "U+202E"),  # right-to-left override
        ("Ann\u2066x\u2069", "U+2066"),  # left-to-right isolate
        ("An\u200bn", "U+200B"),  # zero-width space
        ("Ann\x1b[31m", "U+001B"),  # terminal escape
        ("Ann\u2028Bob", "U+2028"),  # line separator
    ],
)
async def test_control_and_format_characters_in_names_are_refused(
    client: Any, name: str, code: str
) -> None:
    message = await _refused(client, "name", name=name)
    assert code in message
    assert "control or formatting character" in message


async def test_names_are_checked_on_profile_changes_too(client: Any) -> None:
    pair = await register(client)
    resp = await client.patch(
        "/api/v1/me", json={"name": "Eve\u202e"}, headers=bearer(pair["access_token"])
    )
    assert resp.status == 422
    assert (await resp.json())["errors"][0]["field"] == "name"


async def test_names_with_joiners_and_accents_are_accepted(client: Any) -> None:
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"
    body = await register(client, name=f"Zo\u00eb {family}")
    assert body["user"]["name"] == f"Zo\u00eb {family}"
    decomposed = unicodedata.normalize("NFD", "Ren\u00e9e")
    body = await register(client, name=decomposed)
    assert body["user"]["name"] == "Ren\u00e9e"  # stored in NFC


@pytest.mark.parametrize(
    ("password", "says"),
    [
        ("password", "most common"),
        ("PASSWORD", "most common"),
        ("12345678", "most common"),
        ("qwertyuiop", "most common"),
        ("iloveyou", "most common"),
        (" " * 8, "whitespace"),
        ("\t \u00a0 \u3000  \n", "whitespace"),
    ],
)
async def test_blank_and_common_passwords_are_refused(
    client: Any, password: str, says: str
) -> None:
    assert says in await _refused(client, "password", password=password)


@pytest.mark.parametrize("registered_as", ["NFD", "NFC"])
async def test_an_address_signs_in_whatever_its_unicode_form(
    client: Any, registered_as: str
) -> None:
    address = "Ren\u00e9e.M\u00fcller@example.com"
    forms = {f: unicodedata.normalize(f, address) for f in ("NFC", "NFD")}
    assert forms["NFC"] != forms["NFD"]
    await register(client, forms[registered_as], password="correct horse 1")
    for form in ("NFC", "NFD"):
        for spelling in (forms[form], forms[form].upper(), f"  {forms[form]} "):
            resp = await client.post(LOGIN, json={"email": spelling, "password": "correct horse 1"})
            assert resp.status == 200, (form, spelling, await resp.text())
            assert (await resp.json())["user"]["email"] == "ren\u00e9e.m\u00fcller@example.com"


async def test_a_punycode_domain_is_the_same_address(client: Any) -> None:
    await register(client, "ann@b\u00fccher.de", password="correct horse 1")
    resp = await client.post(
        LOGIN, json={"email": "ann@xn--bcher-kva.de", "password": "correct horse 1"}
    )
    assert resp.status == 200
