"""The authorisation matrix: every route of ``web.routes.ROUTES`` by anonymous / owner / other
user / admin, with the status each caller must get.

``EXPECTED`` has one row per ``(method, path)`` of the route table, and
:func:`test_every_route_has_a_row` compares the two sets: a route added without a row, or a row
left behind by a removed route, fails the suite. :func:`test_matrix` sends every cell.

How a cell is played: the resources a path names (a task, a webhook, a notification, a
delivery, a backup, ...) are created fresh for the cell, as the **owner**, so "other user" and
"admin" always ask for the owner's resource (404 on user routes: another user's resource does
not exist for you). The caller's own access token goes in ``Authorization`` (none for
anonymous); a route with a body gets a minimal valid one. One application and three accounts
serve the whole module.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from bson import ObjectId
from pymongo import AsyncMongoClient

from config.settings import Settings
from core import accounts, backup_format, backups, fairness, webhooks
from core.notifications import NewNotification, create_notifications
from core.store import utcnow
from jobs.scheduler import Scheduler
from tests.conftest import TEST_SECRET, bearer
from web.app import create_app
from web.keys import CONTEXT, PLATFORM
from web.routes import API, ROUTES
from web.routing import Route

PASSWORD = "correct horse 1"
CALLERS = ("anonymous", "owner", "other", "admin")


class Row(NamedTuple):
    """The expected status of one route for each caller."""

    anonymous: int
    owner: int
    other: int
    admin: int


# fmt: off
EXPECTED: dict[tuple[str, str], Row] = {
    #                                                           anonymous owner other admin
    # Auth and account ("none" routes ignore the token)
    ("POST", f"{API}/auth/register"):                            Row(201, 201, 201, 201),
    ("POST", f"{API}/auth/login"):                               Row(200, 200, 200, 200),
    ("POST", f"{API}/auth/refresh"):                             Row(200, 200, 200, 200),
    ("POST", f"{API}/auth/logout"):                              Row(401, 204, 204, 204),
    ("GET", f"{API}/me"):                                        Row(401, 200, 200, 200),
    ("PATCH", f"{API}/me"):                                      Row(401, 200, 200, 200),
    # Tasks: lists are the caller's own; another user's task is 404
    ("POST", f"{API}/tasks"):                                    Row(401, 201, 201, 201),
    ("GET", f"{API}/tasks"):                                     Row(401, 200, 200, 200),
    ("GET", f"{API}/tasks/stats"):                               Row(401, 200, 200, 200),
    ("POST", f"{API}/tasks/bulk"):                               Row(401, 200, 200, 200),
    ("GET", f"{API}/tasks/{{id}}"):                              Row(401, 200, 404, 404),
    ("PATCH", f"{API}/tasks/{{id}}"):                            Row(401, 200, 404, 404),
    ("DELETE", f"{API}/tasks/{{id}}"):                           Row(401, 204, 404, 404),
    ("GET", f"{API}/tasks/{{id}}/activity"):                     Row(401, 200, 404, 404),
    ("GET", f"{API}/search"):                                    Row(401, 200, 200, 200),
    # Notifications
    ("GET", f"{API}/notifications"):                             Row(401, 200, 200, 200),
    ("POST", f"{API}/notifications/{{id}}/read"):                Row(401, 200, 404, 404),
    # Webhooks
    ("POST", f"{API}/webhooks"):                                 Row(401, 201, 201, 201),
    ("GET", f"{API}/webhooks"):                                  Row(401, 200, 200, 200),
    ("GET", f"{API}/webhooks/{{id}}"):                           Row(401, 200, 404, 404),
    ("DELETE", f"{API}/webhooks/{{id}}"):                        Row(401, 204, 404, 404),
    ("GET", f"{API}/webhooks/{{id}}/deliveries"):                Row(401, 200, 404, 404),
    ("POST", f"{API}/webhooks/{{id}}/deliveries/{{delivery_id}}/redeliver"):
                                                                 Row(401, 202, 404, 404),
    ("POST", f"{API}/webhooks/{{id}}/resume"):                   Row(401, 200, 404, 404),
    # Analytics
    ("GET", f"{API}/analytics/summary"):                         Row(401, 200, 200, 200),
    # Operators: the admin role, checked after the token (401 before 403)
    ("GET", f"{API}/admin/queues"):                              Row(401, 403, 403, 200),
    ("GET", f"{API}/admin/queues/{{queue}}/dead"):               Row(401, 403, 403, 200),
    ("POST", f"{API}/admin/queues/{{queue}}/dead/retry"):        Row(401, 403, 403, 200),
    ("DELETE", f"{API}/admin/queues/{{queue}}/dead"):            Row(401, 403, 403, 200),
    ("GET", f"{API}/admin/queues/{{queue}}/dead/{{id}}"):          Row(401, 403, 403, 200),
    ("DELETE", f"{API}/admin/queues/{{queue}}/dead/{{id}}"):       Row(401, 403, 403, 204),
    ("GET", f"{API}/admin/queues/{{queue}}/messages"):           Row(401, 403, 403, 200),
    ("POST", f"{API}/admin/queues/{{queue}}/messages/{{id}}/retry"):  Row(401, 403, 403, 200),
    ("DELETE", f"{API}/admin/queues/{{queue}}/messages/{{id}}"):   Row(401, 403, 403, 204),
    ("GET", f"{API}/admin/messages/{{id}}"):                      Row(401, 403, 403, 200),
    ("POST", f"{API}/admin/queues/{{queue}}/pause"):             Row(401, 403, 403, 200),
    ("POST", f"{API}/admin/queues/{{queue}}/resume"):            Row(401, 403, 403, 200),
    ("GET", f"{API}/admin/workers"):                             Row(401, 403, 403, 200),
    ("GET", f"{API}/admin/health"):                              Row(401, 403, 403, 200),
    ("GET", f"{API}/admin/overview"):                            Row(401, 403, 403, 200),
    ("POST", f"{API}/admin/users/{{user_id}}/revoke-sessions"):  Row(401, 403, 403, 204),
    ("GET", f"{API}/admin/schedules"):                           Row(401, 403, 403, 200),
    ("POST", f"{API}/admin/schedules/{{name}}/run"):             Row(401, 403, 403, 202),
    ("GET", f"{API}/admin/schedules/{{name}}/runs"):             Row(401, 403, 403, 200),
    ("GET", f"{API}/admin/history"):                             Row(401, 403, 403, 200),
    ("GET", f"{API}/admin/backlog"):                             Row(401, 403, 403, 200),
    ("GET", f"{API}/admin/share-weights"):                       Row(401, 403, 403, 200),
    ("PUT", f"{API}/admin/share-weights/{{key}}"):               Row(401, 403, 403, 200),
    ("DELETE", f"{API}/admin/share-weights/{{key}}"):            Row(401, 403, 403, 204),
    ("GET", f"{API}/admin/backups"):                             Row(401, 403, 403, 200),
    ("POST", f"{API}/admin/backups"):                            Row(401, 403, 403, 202),
    ("GET", f"{API}/admin/backups/{{id}}"):                      Row(401, 403, 403, 200),
    # Operations and pages: public
    ("GET", "/healthz"):                                         Row(200, 200, 200, 200),
    ("GET", "/readyz"):                                          Row(200, 200, 200, 200),
    ("GET", "/metrics"):                                         Row(200, 200, 200, 200),
    ("GET", f"{API}/openapi.json"):                              Row(200, 200, 200, 200),
    ("GET", "/docs"):                                            Row(200, 200, 200, 200),
    # The dashboard page is public; every call its script makes is an admin route above.
    ("GET", "/admin"):                                           Row(200, 200, 200, 200),
}
# fmt: on

#: Routes that end the caller's own login: the caller signs in afresh for the cell, so the
#: module's tokens stay valid.
OWN_SESSION = {("POST", f"{API}/auth/logout")}


def _key(route: Route) -> tuple[str, str]:
    return (route.method, route.path)


def test_every_route_has_a_row() -> None:
    """A new route without a row, or a stale row without a route, fails here."""
    table = [_key(r) for r in ROUTES]
    assert len(table) == len(set(table)), "the route table repeats a (method, path)"
    missing = sorted(set(table) - set(EXPECTED))
    stale = sorted(set(EXPECTED) - set(table))
    assert not missing, f"routes without a row in EXPECTED: {missing}"
    assert not stale, f"rows in EXPECTED for routes that no longer exist: {stale}"


def test_rows_follow_the_route_auth() -> None:
    """The rows agree with each route's declared ``auth``: 401 for anonymous on user and
    admin routes, 403 for non-admins on admin routes, the same answer for all on public ones."""
    for route in ROUTES:
        row = EXPECTED.get(_key(route))
        if row is None:
            continue  # reported by test_every_route_has_a_row
        label = f"{route.method} {route.path}"
        if route.auth == "none":
            assert len(set(row)) == 1, label
        else:
            assert row.anonymous == 401, label
        if route.auth == "admin":
            assert (row.owner, row.other) == (403, 403), label
            assert 200 <= row.admin < 300, label
        if route.auth == "user":
            assert 200 <= row.owner < 300, label


# --- the module's application and accounts -------------------------------------------------


@dataclass
class User:
    email: str
    password: str
    id: str = ""
    token: str = ""


@dataclass
class World:
    app: Any
    client: TestClient[Any, Any]
    users: dict[str, User] = field(default_factory=dict)

    @property
    def ctx(self) -> Any:
        return self.app[CONTEXT]

    def auth(self, caller: str) -> dict[str, str]:
        return bearer(self.users[caller].token) if caller != "anonymous" else {}


async def _login(client: TestClient[Any, Any], user: User) -> dict[str, Any]:
    resp = await client.post(
        f"{API}/auth/login", json={"email": user.email, "password": user.password}
    )
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(
    mongo_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[World]:
    tag = uuid.uuid4().hex[:10]
    settings = Settings(
        app_env="test",
        mongodb_url=mongo_url,
        mongodb_db=f"t_{tag}",
        redis_url=redis_url,
        redis_prefix=f"t{tag}:",
        jwt_secret=TEST_SECRET,
        log_format="console",
        # The matrix sends a few hundred requests per account: limits are not under test here.
        rate_limit="100000/minute",
        webhook_allow_hosts=["127.0.0.1"],
        backup_dir=str(tmp_path_factory.mktemp("authz-backups")),
    )
    app = create_app(settings, relay=False)
    try:
        async with TestClient(TestServer(app)) as client:
            world = World(app, client)
            # As a running scheduler does: POST /admin/schedules/{name}/run needs it.
            await Scheduler(world.ctx, app[PLATFORM]).publish()
            for caller in ("owner", "other", "admin"):
                user = User(f"{caller}-{tag}@example.com", PASSWORD)
                role: accounts.Role = "admin" if caller == "admin" else "user"
                doc = await accounts.create_user(world.ctx, user.email, PASSWORD, caller, role)
                user.id = str(doc["_id"])
                user.token = (await _login(client, user))["access_token"]
                world.users[caller] = user
            yield world
    finally:
        mongo: AsyncMongoClient[Any] = AsyncMongoClient(mongo_url)
        await mongo.drop_database(settings.mongodb_db)
        await mongo.close()
        r = aioredis.Redis.from_url(redis_url)
        keys = [k async for k in r.scan_iter(match=f"{settings.redis_prefix}*", count=1000)]
        if keys:
            await r.delete(*keys)
        await r.aclose()


# --- building one cell's request ------------------------------------------------------------


async def _create(world: World, path: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = await world.client.post(f"{API}{path}", json=body, headers=world.auth("owner"))
    assert resp.status == 201, await resp.text()
    created: dict[str, Any] = await resp.json()
    return created


async def _task(world: World) -> str:
    return str((await _create(world, "/tasks", {"title": "matrix"}))["id"])


async def _webhook(world: World) -> str:
    url = f"http://127.0.0.1:9/{uuid.uuid4().hex}"
    return str((await _create(world, "/webhooks", {"url": url, "events": ["*"]}))["id"])


async def _delivery(world: World, webhook_id: str) -> str:
    hook = await world.ctx.store["webhooks"].find_one({"_id": ObjectId(webhook_id)})
    event = {
        "id": str(ObjectId()),
        "type": "task.created",
        "user_id": world.users["owner"].id,
        "created_at": utcnow().isoformat().replace("+00:00", "Z"),
        "data": {},
    }
    delivery, _ = await webhooks.ensure_delivery(world.ctx, hook, event)
    return str(delivery["_id"])


async def _notification(world: World) -> str:
    owner = world.users["owner"].id
    key = uuid.uuid4().hex
    item = NewNotification(user_id=owner, key=key, kind="welcome", title="Hi", body="Hello")
    assert await create_notifications(world.ctx, [item]) == 1
    doc = await world.ctx.store["notifications"].find_one({"user_id": owner, "key": key})
    return str(doc["_id"])


async def _backup(world: World) -> str:
    """A finished backup in the catalogue (a queued one would make POST /admin/backups 409)."""
    now = utcnow()
    backup_id = backups.new_id(now)
    await world.ctx.store[backup_format.COLLECTION].insert_one(
        {
            "_id": backup_id,
            "status": "succeeded",
            "manual": True,
            "requested_at": now,
            "finished_at": now,
            "collections": [],
        }
    )
    return backup_id


async def _ready_message(world: World) -> str:
    """A message waiting in the welcome queue (no worker runs here): its broker id."""
    actor = world.app[PLATFORM].actors["send_welcome_email"]
    message = await asyncio.to_thread(actor.send, {"user_id": world.users["owner"].id})
    return str(message.options["redis_message_id"])


async def _dead_letter(world: World) -> str:
    """A dead letter of the welcome queue, stored where Dramatiq's nack puts one."""
    platform = world.app[PLATFORM]
    actor = platform.actors["send_welcome_email"]
    rid = str(uuid.uuid4())
    message = actor.message({"user_id": world.users["owner"].id}).copy(
        options={"redis_message_id": rid}
    )
    inspector = platform.inspector
    xq = inspector.key(f"{actor.queue_name}.XQ")

    def store() -> None:
        inspector.client.zadd(xq, {rid: int(utcnow().timestamp() * 1000)})
        inspector.client.hset(f"{xq}.msgs", rid, message.encode())

    await asyncio.to_thread(store)
    return rid


async def _path_params(world: World, route: Route) -> dict[str, str]:
    """Values for the route's path parameters, created as the owner."""
    names = re.findall(r"\{(\w+)\}", route.path)
    params: dict[str, str] = {}
    for name in names:
        before = route.path.split("{" + name + "}")[0].rstrip("/").rsplit("/", 1)[-1]
        if (before, name) == ("tasks", "id"):
            params[name] = await _task(world)
        elif (before, name) == ("webhooks", "id"):
            params[name] = await _webhook(world)
        elif (before, name) == ("deliveries", "delivery_id"):
            params[name] = await _delivery(world, params["id"])
        elif (before, name) == ("notifications", "id"):
            params[name] = await _notification(world)
        elif (before, name) == ("backups", "id"):
            params[name] = await _backup(world)
        elif (before, name) == ("queues", "queue"):
            params[name] = world.app[PLATFORM].actors["send_welcome_email"].queue_name
        elif (before, name) == ("messages", "id"):
            params[name] = await _ready_message(world)
        elif (before, name) == ("dead", "id"):
            params[name] = await _dead_letter(world)
        elif (before, name) == ("schedules", "name"):
            params[name] = "due-soon-reminders"
        elif (before, name) == ("share-weights", "key"):
            # A weight of its own, stored (as the API does), so DELETE has one to drop.
            params[name] = f"matrix-{uuid.uuid4().hex[:12]}"
            await fairness.set_weight(world.ctx, params[name], 2)
        elif (before, name) == ("users", "user_id"):
            # A bystander: acting on it leaves the module's three accounts alone.
            doc = await accounts.create_user(
                world.ctx, f"{uuid.uuid4().hex[:8]}@example.com", PASSWORD, "Bystander"
            )
            params[name] = str(doc["_id"])
        else:
            raise AssertionError(
                f"no way to make {{{name}}} of {route.path}: teach _path_params how"
            )
    return params


async def _body(world: World, route: Route) -> dict[str, Any] | None:
    """A minimal valid body for routes that take one."""
    if route.body is None:
        return None
    key = _key(route)
    owner = world.users["owner"]
    if key == ("POST", f"{API}/auth/register"):
        email = f"{uuid.uuid4().hex[:8]}@example.com"
        return {"email": email, "password": PASSWORD, "name": "Ann"}
    if key == ("POST", f"{API}/auth/login"):
        return {"email": owner.email, "password": owner.password}
    if key == ("POST", f"{API}/auth/refresh"):
        # A login of its own: rotating the module's refresh token would spend it.
        return {"refresh_token": (await _login(world.client, owner))["refresh_token"]}
    if key == ("PATCH", f"{API}/me"):
        return {"name": "Ann"}
    if key == ("POST", f"{API}/tasks"):
        return {"title": "matrix"}
    if key == ("POST", f"{API}/tasks/bulk"):
        return {"ids": [await _task(world)], "set": {"status": "done"}}
    if key == ("PATCH", f"{API}/tasks/{{id}}"):
        return {"title": "changed"}
    if key == ("POST", f"{API}/webhooks"):
        return {"url": f"http://127.0.0.1:9/{uuid.uuid4().hex}", "events": ["*"]}
    if key == ("POST", f"{API}/admin/queues/{{queue}}/dead/retry"):
        return {}
    if key == ("PUT", f"{API}/admin/share-weights/{{key}}"):
        return {"weight": 3}
    raise AssertionError(f"no minimal body for {route.method} {route.path}: add one to _body")


def _cells() -> list[Any]:
    return [
        pytest.param(route, caller, id=f"{route.method} {route.path} {caller}")
        for route in ROUTES
        for caller in CALLERS
    ]


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize(("route", "caller"), _cells())
async def test_matrix(world: World, route: Route, caller: str) -> None:
    row = EXPECTED.get(_key(route))
    assert row is not None, f"no row in EXPECTED for {route.method} {route.path}"
    expected = getattr(row, caller)

    params = await _path_params(world, route)
    body = await _body(world, route)
    query = {"q": "matrix"} if _key(route) == ("GET", f"{API}/search") else None
    headers = world.auth(caller)
    if _key(route) in OWN_SESSION and caller != "anonymous":
        headers = bearer((await _login(world.client, world.users[caller]))["access_token"])

    path = route.path.format(**params)
    kwargs: dict[str, Any] = {"headers": headers}
    if body is not None:
        kwargs["json"] = body
    if query is not None:
        kwargs["params"] = query
    resp = await world.client.request(route.method, path, **kwargs)
    text = await resp.text()

    assert resp.status == expected, f"{caller} {route.method} {path}: {resp.status} {text[:300]}"
    if expected == 401:
        assert resp.headers.get("WWW-Authenticate", "").startswith("Bearer"), resp.headers
    if expected >= 400:
        assert resp.content_type == "application/problem+json", text[:300]
    if _key(route) == ("POST", f"{API}/tasks/bulk") and caller in ("other", "admin"):
        # 200 for the request, but the owner's task does not exist for this caller.
        assert [r["result"] for r in (await resp.json())["results"]] == ["not_found"], text
