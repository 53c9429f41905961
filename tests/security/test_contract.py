"""Issue 7, "Contract precision": the requests of the schemathesis run replayed by hand.

Before: ``HEAD`` on every GET route (``/healthz`` and ``/readyz`` included) answered 405; a 405
on ``/tasks/bulk`` or ``/tasks/stats`` advertised the methods of ``/tasks/{id}`` (and
``PATCH /tasks/stats`` reached ``PATCH /tasks/{id}`` with the id ``stats``); ``If-Match:
garbage`` answered 412 "the task changed"; errors spoke pydantic's and Python's words ("Value
error, ...", "Input should be ...", ``sys.set_int_max_str_digits()``); ``due_before=0.5`` was
taken for a date; ``2.0`` hours (an integer to JSON Schema) was refused. The whole run is
tests/web/test_fuzz.py::test_schemathesis_run_with_every_check_finds_nothing.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.conftest import bearer, register
from web.routes import ROUTES

pytestmark = pytest.mark.timeout(90)

API = "/api/v1"
SOME_ID = "0123456789abcdef01234567"
GETS = [route for route in ROUTES if route.method == "GET"]
PATHS = sorted({route.path for route in ROUTES})
#: Words of the libraries under the API, which must never reach a client.
FOREIGN = re.compile(
    r"Value error|\w+ should (?:be|have)|Assertion failed|sys\.|int_max_str_digits|pydantic"
)


@pytest.fixture
async def user(client: Any) -> dict[str, str]:
    return bearer((await register(client))["access_token"])


def _concrete(path: str) -> str:
    return re.sub(r"{\w+}", SOME_ID, path)


@pytest.mark.parametrize("route", GETS, ids=[r.path for r in GETS])
async def test_head_is_answered_wherever_get_is(
    client: Any, user: dict[str, str], route: Any
) -> None:
    url = _concrete(route.path)
    got = await client.get(url, headers=user)
    head = await client.head(url, headers=user)
    assert head.status == got.status != 405, (head.status, got.status)
    assert await head.read() == b""
    assert head.headers["Content-Type"] == got.headers["Content-Type"]
    assert "X-Request-ID" in head.headers


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_probes_answer_head(client: Any, path: str) -> None:
    resp = await client.head(path)
    assert resp.status == 200
    assert await resp.read() == b""


@pytest.mark.parametrize("path", PATHS)
async def test_a_405_lists_the_methods_of_that_path_only(
    client: Any, user: dict[str, str], path: str
) -> None:
    declared = {route.method for route in ROUTES if route.path == path}
    expected = declared | ({"HEAD"} if "GET" in declared else set())
    for method in sorted({"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"} - declared):
        resp = await client.request(method, _concrete(path), headers=user)
        assert resp.status == 405, (method, path, resp.status)
        assert set(resp.headers["Allow"].split(",")) == expected, (method, path)
        assert resp.content_type == "application/problem+json"


async def test_static_paths_are_not_task_ids(client: Any, user: dict[str, str]) -> None:
    """``PATCH /tasks/stats`` is 405 (it was 404 "no such task", from PATCH /tasks/{id})."""
    for method, path in (
        ("PATCH", "/tasks/stats"),
        ("DELETE", "/tasks/bulk"),
        ("GET", "/tasks/bulk"),
    ):
        resp = await client.request(method, API + path, headers=user, json={})
        assert resp.status == 405, (method, path)
    stats = await client.options(f"{API}/tasks/stats", headers=user)
    assert stats.headers["Allow"] == "GET,HEAD"
    bulk = await client.options(f"{API}/tasks/bulk", headers=user)
    assert bulk.headers["Allow"] == "POST"


async def _task(client: Any, user: dict[str, str]) -> tuple[str, str]:
    resp = await client.post(f"{API}/tasks", json={"title": "t"}, headers=user)
    assert resp.status == 201
    return (await resp.json())["id"], resp.headers["ETag"]


@pytest.mark.parametrize("value", ["garbage", "", "0", '"a" "b"', '*, "a"', 'w/"a"', '"x'])
async def test_a_malformed_if_match_is_400_not_412(
    client: Any, user: dict[str, str], value: str
) -> None:
    task_id, _ = await _task(client, user)
    url = f"{API}/tasks/{task_id}"
    patch = await client.patch(url, json={"title": "new"}, headers={**user, "If-Match": value})
    assert patch.status == 400, await patch.text()
    assert "If-Match" in (await patch.json())["detail"]
    delete = await client.delete(url, headers={**user, "If-Match": value})
    assert delete.status == 400
    got = await client.get(url, headers={**user, "If-None-Match": value})
    assert got.status == 400
    assert (await (await client.get(url, headers=user)).json())["title"] == "t"


async def test_if_match_follows_rfc_9110(client: Any, user: dict[str, str]) -> None:
    task_id, etag = await _task(client, user)
    url = f"{API}/tasks/{task_id}"

    async def patch(if_match: str) -> int:
        resp = await client.patch(
            url, json={"priority": "high"}, headers={**user, "If-Match": if_match}
        )
        return int(resp.status)

    assert await patch(f'"{task_id}.99", W/{etag}') == 412  # a weak tag never matches
    assert await patch(f'"a,b", {etag}') == 200  # a list; commas inside tags are fine
    assert await patch("*") == 200
    fresh = (await client.get(url, headers=user)).headers["ETag"]
    assert (await client.get(url, headers={**user, "If-None-Match": f"W/{fresh}"})).status == 304


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "field", "message"),
    [
        ("POST", "/webhooks", {"json": {"url": "ftp://x", "events": ["*"]}}, "url", "Only http"),
        ("GET", "/tasks", {"params": {"limit": "many"}}, "limit", "Must be an integer"),
        ("GET", "/tasks", {"params": {"limit": "9" * 5000}}, "limit", "Number too large"),
        ("GET", "/tasks", {"params": {"status": "nope"}}, "status", "Must be one of"),
        ("GET", "/tasks", {"params": {"due_before": "0.5"}}, "due_before", "RFC 3339"),
        ("POST", "/tasks", {"json": {"title": "t", "due_at": "2030-01-01T10:00"}}, "due_at", "RFC"),
        ("POST", "/tasks", {"json": {"title": ""}}, "title", "at least 1 character"),
        (
            "PATCH",
            "/me",
            {"json": {"notification_prefs": {"due_soon_window_hours": 2.5}}},
            "notification_prefs.due_soon_window_hours",
            "Must be an integer",
        ),
    ],
)
async def test_errors_speak_the_apis_words(
    client: Any,
    user: dict[str, str],
    method: str,
    path: str,
    kwargs: dict[str, Any],
    field: str,
    message: str,
) -> None:
    resp = await client.request(method, API + path, headers=user, **kwargs)
    text = await resp.text()
    assert resp.status == 422, text
    assert not FOREIGN.search(text), text
    errors = {e["field"]: e["message"] for e in (await resp.json())["errors"]}
    assert message in errors[field], errors


async def test_a_huge_integer_literal_gets_a_plain_answer(
    client: Any, user: dict[str, str]
) -> None:
    raw = '{"title": "t", "tags": [' + "9" * 5000 + "]}"
    resp = await client.post(
        f"{API}/tasks", data=raw, headers={**user, "Content-Type": "application/json"}
    )
    assert resp.status == 400
    assert not FOREIGN.search(await resp.text())


async def test_an_integral_number_is_an_integer(client: Any, user: dict[str, str]) -> None:
    """JSON Schema's ``integer`` includes ``2.0``; the server takes it as 2."""
    body = {"notification_prefs": {"due_soon_window_hours": 2.0}}
    resp = await client.patch(f"{API}/me", json=body, headers=user)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["notification_prefs"]["due_soon_window_hours"] == 2
