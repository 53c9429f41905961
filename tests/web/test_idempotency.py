"""``Idempotency-Key`` over HTTP: POST /auth/register, plus a test-only authenticated route."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from bson import ObjectId

from core import idempotency
from core.errors import NotFound
from tests.conftest import bearer, register
from web.keys import CONTEXT
from web.routing import Route, claims, json_response, wrap

pytestmark = pytest.mark.timeout(90)

REGISTER = "/api/v1/auth/register"
KEY = "Idempotency-Key"


def signup(email: str | None = None, name: str = "Ann") -> dict[str, str]:
    return {
        "email": email or f"{uuid.uuid4().hex[:8]}@example.com",
        "password": "correct horse 1",
        "name": name,
    }


async def users_with(client: Any, email: str) -> int:
    count: int = await client.app[CONTEXT].store["users"].count_documents({"email": email})
    return count


async def test_repeat_gets_the_first_response(client: Any) -> None:
    payload = signup()
    first = await client.post(REGISTER, json=payload, headers={KEY: "reg-1"})
    second = await client.post(REGISTER, json=payload, headers={KEY: "reg-1"})
    assert (first.status, second.status) == (201, 201)
    assert await first.read() == await second.read()
    body = await second.json()
    assert body["user"]["email"] == payload["email"]
    assert "Idempotent-Replayed" not in first.headers
    assert second.headers["Idempotent-Replayed"] == "true"
    for header in ("Location", "Content-Type"):
        assert second.headers[header] == first.headers[header]
    assert second.headers["X-Request-ID"] != first.headers["X-Request-ID"]
    assert await users_with(client, payload["email"]) == 1


async def test_same_key_different_body_is_422(client: Any) -> None:
    first = await client.post(REGISTER, json=signup(), headers={KEY: "reg-1"})
    assert first.status == 201
    other = await client.post(REGISTER, json=signup(), headers={KEY: "reg-1"})
    assert other.status == 422
    assert other.content_type == "application/problem+json"
    problem = await other.json()
    assert problem["errors"][0]["field"] == "header.Idempotency-Key"
    assert await client.app[CONTEXT].store["users"].count_documents({}) == 1


async def test_three_concurrent_repeats_create_one_user(client: Any) -> None:
    payload = signup()
    responses = await asyncio.gather(
        *(client.post(REGISTER, json=payload, headers={KEY: "race"}) for _ in range(3))
    )
    created = [r for r in responses if r.status == 201 and "Idempotent-Replayed" not in r.headers]
    assert len(created) == 1
    original = await created[0].read()
    for resp in responses:
        if resp is created[0]:
            continue
        if resp.status == 409:
            assert resp.headers["Retry-After"] == "1"
            assert "still being processed" in (await resp.json())["detail"]
        else:
            assert resp.status == 201
            assert resp.headers["Idempotent-Replayed"] == "true"
            assert await resp.read() == original
    assert await users_with(client, payload["email"]) == 1


async def test_other_addresses_do_not_share_keys(client: Any) -> None:
    payload = signup()
    mine = await client.post(REGISTER, json=payload, headers={KEY: "shared"})
    assert mine.status == 201
    url = client.make_url(REGISTER)
    # Loopback is a /8 on Linux: another source address is another anonymous caller.
    for address, body, status in [
        ("127.0.0.2", signup(), 201),  # one scope would make this a 422 (different body)
        ("127.0.0.3", payload, 409),  # one scope would replay the first caller's tokens
    ]:
        connector = aiohttp.TCPConnector(local_addr=(address, 0))
        async with aiohttp.ClientSession(connector=connector) as other:
            resp = await other.post(url, json=body, headers={KEY: "shared"})
            assert resp.status == status, await resp.text()
            assert "Idempotent-Replayed" not in resp.headers


async def test_client_errors_are_replayed(client: Any) -> None:
    payload = signup()
    await register(client, payload["email"])
    first = await client.post(REGISTER, json=payload, headers={KEY: "dup"})
    assert first.status == 409
    again = await client.post(REGISTER, json=payload, headers={KEY: "dup"})
    assert again.status == 409
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.content_type == "application/problem+json"
    assert await again.read() == await first.read()


async def test_invalid_body_does_not_use_up_the_key(client: Any) -> None:
    bad = await client.post(REGISTER, json={"email": "x"}, headers={KEY: "k"})
    assert bad.status == 422
    good = await client.post(REGISTER, json=signup(), headers={KEY: "k"})
    assert good.status == 201
    assert "Idempotent-Replayed" not in good.headers


async def test_without_a_key_nothing_is_recorded(client: Any) -> None:
    await register(client)
    await register(client)
    store = client.app[CONTEXT].store
    assert await store[idempotency.COLLECTION].count_documents({}) == 0
    assert await store["users"].count_documents({}) == 2


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there", "caf\u00e9"])
async def test_bad_key_is_422(client: Any, key: str) -> None:
    resp = await client.post(REGISTER, json=signup(), headers={KEY: key})
    assert resp.status == 422
    problem = await resp.json()
    assert problem["errors"][0]["field"] == "header.Idempotency-Key"
    assert await client.app[CONTEXT].store["users"].count_documents({}) == 0


async def test_two_key_headers_are_422(client: Any) -> None:
    headers = [(KEY, "a"), (KEY, "b")]
    resp = await client.post(REGISTER, json=signup(), headers=headers)
    assert resp.status == 422


async def test_records_expire_after_24_hours(client: Any) -> None:
    indexes = await client.app[CONTEXT].store[idempotency.COLLECTION].index_information()
    ttl = [i for i in indexes.values() if i["key"] == [("expires_at", 1)]]
    assert len(ttl) == 1
    assert ttl[0]["expireAfterSeconds"] == 0


async def test_openapi_documents_the_header(client: Any) -> None:
    doc = await (await client.get("/api/v1/openapi.json")).json()
    op = doc["paths"][REGISTER]["post"]
    names = [(p["name"], p["in"], p["required"]) for p in op.get("parameters", [])]
    assert ("Idempotency-Key", "header", False) in names
    assert "409" in op["responses"]
    assert "Idempotent-Replayed" in op["responses"]["201"]["headers"]
    login = doc["paths"]["/api/v1/auth/login"]["post"]
    assert "Idempotency-Key" not in [p["name"] for p in login.get("parameters", [])]


# A test-only authenticated create route: scope by user, an in-flight repeat, a failing handler.


class Things:
    """State of the test route's handler."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail_next = False
        self.entered = asyncio.Event()
        self.gate: asyncio.Event | None = None


@pytest.fixture
async def things_client(app: web.Application, aiohttp_client: Any) -> Any:
    """The app plus ``POST /test/things``, declared idempotent, answering 201 + ETag."""
    state = Things()

    async def create_thing(request: web.Request) -> web.Response:
        state.calls += 1
        state.entered.set()
        if state.gate is not None:
            await state.gate.wait()
        if state.fail_next:
            state.fail_next = False
            raise RuntimeError("database fell over")
        if request.headers.get("X-Missing"):
            raise NotFound("No such list")
        thing = {"_id": ObjectId(), "owner": claims(request).subject}
        await request.app[CONTEXT].store["things"].insert_one(thing)
        tid = str(thing["_id"])
        return json_response(
            {"id": tid},
            status=201,
            headers={"Location": f"/test/things/{tid}", "ETag": f'"{tid}"', "X-Extra": "1"},
        )

    route = Route("POST", "/test/things", create_thing, "t", "t", idempotent=True, status=201)
    app.router.add_route(route.method, route.path, wrap(route))
    client = await aiohttp_client(app)
    client.things = state
    return client


async def test_keys_are_scoped_to_the_user(things_client: Any) -> None:
    ann = bearer((await register(things_client))["access_token"])
    bob = bearer((await register(things_client))["access_token"])
    a1 = await things_client.post("/test/things", headers={**ann, KEY: "same"})
    b1 = await things_client.post("/test/things", headers={**bob, KEY: "same"})
    a2 = await things_client.post("/test/things", headers={**ann, KEY: "same"})
    assert (a1.status, b1.status, a2.status) == (201, 201, 201)
    assert (await a1.json())["id"] != (await b1.json())["id"]
    assert "Idempotent-Replayed" not in b1.headers
    assert (await a2.json())["id"] == (await a1.json())["id"]
    assert a2.headers["Idempotent-Replayed"] == "true"
    assert a2.headers["ETag"] == a1.headers["ETag"]
    assert a2.headers["Location"] == a1.headers["Location"]
    assert "X-Extra" not in a2.headers
    assert things_client.things.calls == 2
    assert await things_client.app[CONTEXT].store["things"].count_documents({}) == 2


async def test_repeat_while_first_runs_is_409(things_client: Any) -> None:
    auth = bearer((await register(things_client))["access_token"])
    things_client.things.gate = asyncio.Event()
    first = asyncio.create_task(things_client.post("/test/things", headers={**auth, KEY: "slow"}))
    await asyncio.wait_for(things_client.things.entered.wait(), 10)
    busy = await things_client.post("/test/things", headers={**auth, KEY: "slow"})
    assert busy.status == 409
    assert busy.headers["Retry-After"] == "1"
    assert busy.content_type == "application/problem+json"
    assert (await busy.json())["detail"] == (
        "A request with this Idempotency-Key is still being processed"
    )
    things_client.things.gate.set()
    done = await first
    assert done.status == 201
    later = await things_client.post("/test/things", headers={**auth, KEY: "slow"})
    assert later.headers["Idempotent-Replayed"] == "true"
    assert await later.read() == await done.read()
    assert things_client.things.calls == 1


async def test_a_500_releases_the_key(things_client: Any) -> None:
    auth = bearer((await register(things_client))["access_token"])
    things_client.things.fail_next = True
    failed = await things_client.post("/test/things", headers={**auth, KEY: "retry-me"})
    assert failed.status == 500
    retried = await things_client.post("/test/things", headers={**auth, KEY: "retry-me"})
    assert retried.status == 201
    assert "Idempotent-Replayed" not in retried.headers
    assert things_client.things.calls == 2
    assert await things_client.app[CONTEXT].store["things"].count_documents({}) == 1


async def test_a_handler_404_is_stored(things_client: Any) -> None:
    auth = {**bearer((await register(things_client))["access_token"]), KEY: "nf"}
    first = await things_client.post("/test/things", headers={**auth, "X-Missing": "1"})
    assert first.status == 404
    again = await things_client.post("/test/things", headers={**auth, "X-Missing": "1"})
    assert again.status == 404
    assert again.headers["Idempotent-Replayed"] == "true"
    assert things_client.things.calls == 1
