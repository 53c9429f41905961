"""Issue 7: JSON bodies an attacker shapes are refused before they reach a parser or a model.

Before the fix a body nested 1,000 deep answered 500 (RecursionError) on any route, the
anonymous sign-in included; ``NaN`` and repeated keys were taken; a body without
``Content-Type`` was 422; and errors quoted Python ("Expecting value: line 1 column 1 (char
0)", "sys.set_int_max_str_digits()").
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from web.jsonbody import MAX_DEPTH, too_deep

LOGIN = "/api/v1/auth/login"
JSON = {"Content-Type": "application/json"}


async def _problem(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/problem+json"
    problem: dict[str, Any] = await resp.json()
    assert problem["status"] == status
    return problem


def _no_python(detail: str) -> None:
    for words in ("Expecting", "char ", "Traceback", "set_int_max_str_digits", "Errno", "b'"):
        assert words not in detail, detail


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 1_000, 100_000])
async def test_deeply_nested_body_is_400_not_500(client: Any, depth: int) -> None:
    for raw in ("[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth):
        resp = await client.post(LOGIN, data=raw.encode(), headers=JSON)
        problem = await _problem(resp, 400)
        assert f"deeper than {MAX_DEPTH}" in problem["detail"]


async def test_nesting_within_the_limit_and_brackets_in_strings_are_fine(client: Any) -> None:
    # Brackets inside strings are text, not nesting: the model decides (a wrong password).
    password = '["{' * 500 + '\\"'
    resp = await client.post(LOGIN, json={"email": "nobody@example.com", "password": password})
    assert resp.status in (401, 422), await resp.text()
    # Nested but within the limit: the parser takes it and the model refuses the shape (422).
    inner = MAX_DEPTH - 1  # the object itself is one level
    raw = '{"email": "a@b.co", "password": ' + "[" * inner + "]" * inner + "}"
    resp = await client.post(LOGIN, data=raw.encode(), headers=JSON)
    await _problem(resp, 422)


@pytest.mark.parametrize(
    "raw",
    [
        '{"email": "a@b.co", "password": NaN}',
        '{"email": "a@b.co", "password": Infinity}',
        '{"email": "a@b.co", "password": -Infinity}',
        '{"email": "a@b.co", "password": "one", "password": "two"}',
        '{"email": "a@b.co", "password": "x", "extra": {"k": 1, "k": 2}}',
    ],
)
async def test_nan_and_repeated_keys_are_refused(client: Any, raw: str) -> None:
    resp = await client.post(LOGIN, data=raw.encode(), headers=JSON)
    problem = await _problem(resp, 400)
    assert "not valid JSON" in problem["detail"]
    _no_python(problem["detail"])


async def test_missing_or_wrong_content_type_is_415(client: Any) -> None:
    body = b'{"email": "a@b.co", "password": "x"}'
    resp = await client.post(LOGIN, data=body, skip_auto_headers=["Content-Type"])
    problem = await _problem(resp, 415)
    assert resp.headers["Accept"] == "application/json"
    assert "Content-Type" in problem["detail"]
    for kind in ("text/plain", "application/x-www-form-urlencoded", "application/jsonx"):
        resp = await client.post(LOGIN, data=body, headers={"Content-Type": kind})
        await _problem(resp, 415)


@pytest.mark.parametrize(
    "raw",
    [b"", b"{not json", b'{"email": "a@b.co",', b"\xff\xfe{}", b'{"n": ' + b"9" * 5000 + b"}"],
)
async def test_unreadable_bodies_are_400_in_our_words(client: Any, raw: bytes) -> None:
    resp = await client.post(LOGIN, data=raw, headers=JSON)
    problem = await _problem(resp, 400)
    _no_python(problem["detail"])


def test_depth_scan_is_cheap_on_the_largest_body() -> None:
    worst = b"[" + b"[]," * (1024 * 1024 // 3 - 1) + b"[]]"  # 1 MiB, many brackets, shallow
    started = time.perf_counter()
    assert not too_deep(worst)
    deep = b"[" * 1_000_000
    assert too_deep(deep)
    assert not too_deep(b'"' + b"[" * 1_000_000 + b'"')
    assert time.perf_counter() - started < 2.0
