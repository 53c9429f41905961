"""Issue 7, "one user's slow webhook receiver stalls every user's side effects".

The attack: user A points 20 webhooks at a receiver that answers slowly, then writes; every
worker thread ends up waiting on A's receiver and user B's write takes 20 s to become
searchable. Here the in-process worker is started as ``taskmanager run`` starts it (webhook
deliveries in a pool of their own, :class:`workers.pools.WorkerPools`), over the real Redis
broker, MongoDB test server and real aiohttp receivers on loopback (allowed through
``WEBHOOK_ALLOW_HOSTS``). Nothing is sent anywhere but 127.0.0.1.

Also: a user's deliveries in flight are capped (waiting for a slot spends no retry, and a
crashed worker's slot expires), and an endpoint that keeps failing is paused by a circuit
breaker (visible in the API, its deliveries held, resumable).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from aiohttp import web

from core import webhooks
from tests.conftest import bearer, eventually, register, serve_http
from web.app import create_app
from web.keys import CONTEXT, PLATFORM
from workers.broker import WEBHOOK_QUEUES, general_queues
from workers.pools import WorkerPools

W = "/api/v1/webhooks"
BASE = {
    "webhook_allow_hosts": ["127.0.0.1"],
    "webhook_min_backoff_ms": 50,
    "webhook_max_backoff_ms": 200,
    "rate_limit": "100000/minute",
}


@dataclass
class Receiver:
    """A loopback receiver that answers after ``delay`` with ``status``, counting how many
    requests it is answering at once, per path prefix (one per user)."""

    delay: float = 0.0
    status: int = 200
    port: int = 0
    hits: list[tuple[str, float]] = field(default_factory=list)
    busy: dict[str, int] = field(default_factory=dict)
    peak: dict[str, int] = field(default_factory=dict)

    def url(self, who: str, name: str = "h") -> str:
        return f"http://127.0.0.1:{self.port}/{who}/{name}"

    async def handle(self, request: web.Request) -> web.Response:
        who = request.match_info["who"]
        await request.read()
        self.hits.append((who, time.monotonic()))
        self.busy[who] = self.busy.get(who, 0) + 1
        self.peak[who] = max(self.peak.get(who, 0), self.busy[who])
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            return web.Response(status=self.status, text="ok")
        finally:
            self.busy[who] -= 1

    def count(self, who: str) -> int:
        return sum(1 for w, _ in self.hits if w == who)

    async def wait_for(self, who: str, count: int, timeout: float = 30.0) -> None:
        what = f"{count} requests to {who}"
        await eventually(lambda: self.count(who) >= count, what, timeout=timeout)


@pytest.fixture
async def receiver(aiohttp_server: Any) -> Receiver:
    rec = Receiver()
    rec.port = await serve_http(aiohttp_server, ("POST", "/{who}/{name}", rec.handle))
    return rec


@pytest.fixture
async def pools() -> AsyncIterator[list[WorkerPools]]:
    started: list[WorkerPools] = []
    yield started
    for pool in started:
        await asyncio.to_thread(pool.stop, 30_000)


#: Starts the app with its worker pools (see the ``start`` fixture); returns ``(app, client)``.
Start = Callable[..., Awaitable[tuple[Any, Any]]]


@pytest.fixture
def start(
    brokers: list[Any], pools: list[WorkerPools], make_settings: Any, aiohttp_client: Any
) -> Start:
    """Start the app (``BASE`` settings plus keyword overrides) with worker pools as
    ``taskmanager run`` does (cli/main.py), with fewer threads; all stopped after the test."""

    async def go(*, threads: int = 2, webhook_threads: int = 4, **overrides: Any) -> Any:
        app = create_app(make_settings(**{**BASE, **overrides}))
        brokers.append(app[PLATFORM].broker)
        client = await aiohttp_client(app)
        pool = WorkerPools.split(
            app[PLATFORM].broker,
            threads=threads,
            webhook_threads=webhook_threads,
            worker_timeout=100,
        )
        pool.start()
        pools.append(pool)
        return app, client

    return go


async def user(client: Any) -> dict[str, str]:
    return bearer((await register(client))["access_token"])


async def add_hook(client: Any, auth: dict[str, str], url: str, events: list[str]) -> Any:
    resp = await client.post(W, json={"url": url, "events": events}, headers=auth)
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def add_task(client: Any, auth: dict[str, str], title: str = "t") -> Any:
    resp = await client.post("/api/v1/tasks", json={"title": title}, headers=auth)
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def searchable_after(client: Any, auth: dict[str, str], timeout: float = 30.0) -> float:
    """Seconds from B's write until ``GET /search`` finds the task."""
    word = "zq" + uuid.uuid4().hex[:10]
    began = time.monotonic()
    task = await add_task(client, auth, f"report {word}")
    while True:
        resp = await client.get("/api/v1/search", params={"q": word}, headers=auth)
        assert resp.status == 200, await resp.text()
        if any(hit["task"]["id"] == task["id"] for hit in (await resp.json())["items"]):
            return time.monotonic() - began
        if time.monotonic() - began > timeout:
            raise AssertionError("B's task never became searchable")
        await asyncio.sleep(0.05)


def test_webhook_queues_have_their_own_pool(make_settings: Any) -> None:
    """The split `taskmanager run` uses: webhook queues in one pool, every other in another."""
    from config.connections import Connections
    from workers.broker import build_broker

    platform = build_broker(Connections(make_settings()))
    try:
        split = WorkerPools.split(platform.broker, threads=3, webhook_threads=5)
        general, hooks = split.workers
        assert hooks.consumer_whitelist == set(WEBHOOK_QUEUES) == {"webhooks"}
        assert general.consumer_whitelist == general_queues(platform.broker)
        assert not general.consumer_whitelist & hooks.consumer_whitelist
        assert "search" in general.consumer_whitelist
        assert (general.worker_threads, hooks.worker_threads) == (3, 5)
        actors = platform.actors
        assert {actors[n].queue_name for n in ("deliver_webhook", "fan_out_webhooks")} == {
            "webhooks"
        }
    finally:
        platform.close()


async def test_pools_register_as_one_worker(start: Start) -> None:
    """The process boots its middleware once and registers every pool's queues and threads
    (``/admin/workers``, ``taskmanager healthcheck worker``)."""
    from workers.heartbeat import WorkerHeartbeat

    app, _ = await start(threads=2)
    [beat] = [m for m in app[PLATFORM].broker.middleware if isinstance(m, WorkerHeartbeat)]
    assert beat.state == "running"
    assert set(beat.queues) == general_queues(app[PLATFORM].broker) | WEBHOOK_QUEUES
    assert beat.threads == 2 + 4


async def test_slow_receiver_of_one_user_does_not_delay_another_users_search(
    start: Start, receiver: Receiver
) -> None:
    app, client = await start(webhook_timeout=12, webhook_max_retries=0)
    a, b = await user(client), await user(client)
    idle = await searchable_after(client, b)

    # A: 20 webhooks to a receiver that takes 9 s per request, then a few writes (60
    # deliveries): once, this filled every worker thread for minutes.
    receiver.delay = 9.0
    for n in range(webhooks.MAX_WEBHOOKS_PER_USER):
        await add_hook(client, a, receiver.url("a", str(n)), ["*"])
    for _ in range(3):
        await add_task(client, a)
    await receiver.wait_for("a", 4)

    loaded = await searchable_after(client, b)
    assert loaded < idle + 3.0, f"B waited {loaded:.1f} s behind A's receiver (idle {idle:.1f} s)"
    # A's deliveries were capped at the default in-flight limit the whole time.
    assert receiver.peak["a"] <= app[CONTEXT].settings.webhook_max_in_flight_per_user


async def test_in_flight_cap_per_user_and_waiting_spends_no_retry(
    start: Start, receiver: Receiver
) -> None:
    """Cap 2: A's six deliveries go two at a time; with no retries at all they still all
    succeed (waiting for a slot is not a failed attempt); B is not held back by A's cap."""
    app, client = await start(
        webhook_threads=6,
        webhook_max_in_flight_per_user=2,
        webhook_max_retries=0,
        webhook_timeout=10,
    )
    a, b = await user(client), await user(client)
    receiver.delay = 1.5
    hook = await add_hook(client, a, receiver.url("a"), ["task.created"])
    for _ in range(6):
        await add_task(client, a)
    await receiver.wait_for("a", 2)
    began = time.monotonic()
    await add_hook(client, b, receiver.url("b"), ["task.created"])
    await add_task(client, b)
    await receiver.wait_for("b", 1)
    assert time.monotonic() - began < 1.5 + 3.0, "B's delivery waited for A's cap"

    await receiver.wait_for("a", 6, timeout=40)
    coll = app[CONTEXT].store["webhook_deliveries"]
    deadline = time.monotonic() + 20
    while await coll.count_documents({"webhook_id": hook["id"], "status": "succeeded"}) < 6:
        assert time.monotonic() < deadline, await coll.find({"webhook_id": hook["id"]}).to_list()
        await asyncio.sleep(0.1)
    assert receiver.peak["a"] == 2
    assert receiver.count("a") == 6
    assert all(d["attempts"] == 1 for d in await coll.find({"webhook_id": hook["id"]}).to_list())
    # Every slot was given back.
    assert await webhooks.slots_in_use(app[CONTEXT], await owner_of(app, hook["id"])) == 0


async def owner_of(app: Any, hook_id: str) -> str:
    doc = await app[CONTEXT].store["webhooks"].find_one({"_id": webhooks.oid(hook_id)})
    return str(doc["owner"])


async def test_a_crashed_workers_slot_expires(ctx: Any) -> None:
    """A worker killed mid-attempt never gives its slot back: it lapses after the lease."""
    cap = ctx.settings.webhook_max_in_flight_per_user
    for n in range(cap):
        assert await webhooks.take_slot(ctx, "u1", f"dead{n}", timedelta(milliseconds=300))
    assert not await webhooks.take_slot(ctx, "u1", "next", timedelta(seconds=30))
    assert await webhooks.take_slot(ctx, "u2", "other-user", timedelta(seconds=30))
    await asyncio.sleep(0.4)
    assert await webhooks.take_slot(ctx, "u1", "next", timedelta(seconds=30))
    assert await webhooks.slots_in_use(ctx, "u1") == 1
    await webhooks.free_slot(ctx, "u1", "next")
    assert await webhooks.slots_in_use(ctx, "u1") == 0


async def test_breaker_pauses_a_failing_endpoint_holds_and_resumes(
    start: Start, receiver: Receiver
) -> None:
    app, client = await start(webhook_breaker_failures=3, webhook_max_retries=0)
    a = await user(client)
    receiver.status = 500
    hook = await add_hook(client, a, receiver.url("a"), ["task.created"])
    coll = app[CONTEXT].store["webhook_deliveries"]

    async def statuses() -> list[str]:
        docs = await coll.find({"webhook_id": hook["id"]}).sort("event_oid", 1).to_list()
        return [d["status"] for d in docs]

    async def wait_statuses(expected: list[str], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while (got := await statuses()) != expected:
            assert time.monotonic() < deadline, got
            await asyncio.sleep(0.05)

    for n in range(3):
        await add_task(client, a)
        await wait_statuses(["dead"] * (n + 1))
    assert receiver.count("a") == 3

    one = await (await client.get(f"{W}/{hook['id']}", headers=a)).json()
    assert one["state"] == "paused"
    assert one["paused_reason"].startswith("3 consecutive failed deliveries")
    assert "HTTP 500" in one["paused_reason"]
    assert one["paused_at"] is not None
    listed = await (await client.get(W, headers=a)).json()
    assert [(h["id"], h["state"]) for h in listed["items"]] == [(hook["id"], "paused")]

    # Paused: new events are recorded as held in the delivery log, and nothing is sent.
    await add_task(client, a)
    await add_task(client, a)
    await wait_statuses(["dead", "dead", "dead", "held", "held"])
    log = await (await client.get(f"{W}/{hook['id']}/deliveries", headers=a)).json()
    held = [d for d in log["items"] if d["status"] == "held"]
    assert len(held) == 2
    assert all("paused" in d["last_error"] and d["attempts"] == 0 for d in held)
    await asyncio.sleep(0.5)
    assert receiver.count("a") == 3

    # Someone else cannot resume it.
    other = await user(client)
    assert (await client.post(f"{W}/{hook['id']}/resume", headers=other)).status == 404

    # Fixed and resumed: active again, and the held deliveries are sent.
    receiver.status = 200
    resp = await client.post(f"{W}/{hook['id']}/resume", headers=a)
    assert resp.status == 200, await resp.text()
    resumed = await resp.json()
    assert (resumed["state"], resumed["paused_reason"], resumed["paused_at"]) == (
        "active",
        None,
        None,
    )
    assert resumed["redelivered"] == 2
    await wait_statuses(["dead", "dead", "dead", "succeeded", "succeeded"])
    assert receiver.count("a") == 5
    again = await (await client.post(f"{W}/{hook['id']}/resume", headers=a)).json()
    assert again["redelivered"] == 0


async def test_a_success_resets_the_breaker_count(start: Start, receiver: Receiver) -> None:
    """Only failures in a row count: fail, fail, succeed, fail, fail stays active."""
    app, client = await start(webhook_breaker_failures=3, webhook_max_retries=0)
    a = await user(client)
    hook = await add_hook(client, a, receiver.url("a"), ["task.created"])
    for n, status in enumerate((500, 500, 200, 500, 500)):
        receiver.status = status
        await add_task(client, a)
        await receiver.wait_for("a", n + 1)
        await asyncio.to_thread(app[PLATFORM].broker.join, "webhooks", timeout=20_000)
    one = await (await client.get(f"{W}/{hook['id']}", headers=a)).json()
    assert one["state"] == "active"
