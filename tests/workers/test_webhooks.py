"""Webhook deliveries end to end: API → outbox → relay → Redis broker → worker → a real HTTP
receiver on loopback. Nothing is ever sent anywhere but 127.0.0.1."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from aiohttp import web
from dramatiq import Worker

from config.connections import Connections
from core import webhooks
from core.events import public_event
from core.ssrf import Target
from core.store import Doc, utcnow
from tests.conftest import bearer, eventually, register, serve_http, signed
from web.app import create_app
from web.keys import CONTEXT, PLATFORM
from workers.actors import ActorContext
from workers.broker import build_broker
from workers.registry import registry_index
from workers.webhooks import Deferred, DeliveryRefused, attempt_delivery, deliver_webhook, post

W = "/api/v1/webhooks"
FAST = {
    "webhook_allow_hosts": ["127.0.0.1"],
    "webhook_max_retries": 2,
    "webhook_min_backoff_ms": 50,
    "webhook_max_backoff_ms": 1000,
    "rate_limit": "10000/minute",
}


@dataclass
class Hit:
    """One request the receiver got."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """A real HTTP server on loopback that records what it receives."""

    status: int = 200
    delay: float = 0.0
    reply: str = "ok"
    hits: list[Hit] = field(default_factory=list)
    strays: list[Hit] = field(default_factory=list)
    port: int = 0

    def url(self, name: str = "a") -> str:
        return f"http://127.0.0.1:{self.port}/hook/{name}"

    async def hook(self, request: web.Request) -> web.Response:
        self.hits.append(
            Hit(request.path, dict(request.headers), await request.read(), time.monotonic())
        )
        if self.delay:
            await asyncio.sleep(self.delay)
        if 300 <= self.status < 400:
            return web.Response(
                status=self.status, headers={"Location": f"http://127.0.0.1:{self.port}/stray"}
            )
        return web.Response(status=self.status, text=self.reply)

    async def stray(self, request: web.Request) -> web.Response:
        self.strays.append(
            Hit(request.path, dict(request.headers), await request.read(), time.monotonic())
        )
        return web.Response(text="followed")

    async def wait_for(self, count: int, timeout: float = 20.0) -> list[Hit]:
        await eventually(lambda: len(self.hits) >= count, f"{count} requests", timeout=timeout)
        return list(self.hits)


@pytest.fixture
async def receiver(aiohttp_server: Any) -> Receiver:
    rec = Receiver()
    rec.port = await serve_http(
        aiohttp_server, ("POST", "/hook/{name}", rec.hook), ("*", "/stray", rec.stray)
    )
    return rec


@pytest.fixture
async def run_worker(brokers: list[Any], worker_for: Any) -> AsyncIterator[Any]:
    """``worker_for``, and before it stops the workers, wait for every queue to drain."""
    started: list[Any] = []

    def start(app: Any) -> Any:
        started.append(app[PLATFORM].broker)
        return worker_for(app)

    yield start
    for broker in started:
        await settle(broker)


async def setup(
    brokers: list[Any],
    make_settings: Any,
    aiohttp_client: Any,
    start_worker: Any | None,
    **overrides: Any,
) -> tuple[Any, Any, dict[str, str]]:
    app = create_app(make_settings(**{**FAST, **overrides}))
    brokers.append(app[PLATFORM].broker)
    client = await aiohttp_client(app)
    if start_worker is not None:
        start_worker(app)
    pair = await register(client)
    return app, client, bearer(pair["access_token"])


async def add_hook(client: Any, auth: dict[str, str], url: str, events: list[str]) -> Any:
    resp = await client.post(W, json={"url": url, "events": events}, headers=auth)
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def add_task(client: Any, auth: dict[str, str], **fields: Any) -> Any:
    resp = await client.post("/api/v1/tasks", json={"title": "t", **fields}, headers=auth)
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def wait_delivery(
    app: Any, hook_id: str, done: Callable[[Doc], bool], timeout: float = 20.0
) -> Doc:
    """Poll the delivery log (MongoDB) until a delivery of the webhook satisfies ``done``."""
    coll = app[CONTEXT].store["webhook_deliveries"]
    deadline = time.monotonic() + timeout
    while True:
        docs = await coll.find({"webhook_id": hook_id}).to_list()
        for doc in docs:
            if done(doc):
                return doc
        if time.monotonic() > deadline:
            raise AssertionError(f"no delivery reached the state; have {docs}")
        await asyncio.sleep(0.05)


async def dead_lettered(app: Any) -> list[dict[str, Any]]:
    ctx = app[CONTEXT]
    raw = await ctx.redis.hgetall(ctx.key("dramatiq", "webhooks.XQ.msgs"))
    return [json.loads(v) for v in raw.values()]


async def wait_dead_lettered(app: Any, delivery_id: str, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        for message in await dead_lettered(app):
            if message["actor_name"] == "deliver_webhook" and message["args"][0] == delivery_id:
                return message
        if time.monotonic() > deadline:
            raise AssertionError("the message never reached the dead-letter queue")
        await asyncio.sleep(0.05)


async def join(app: Any) -> None:
    """Wait until the webhooks queue (ready, delayed and in flight) is empty."""
    await asyncio.to_thread(app[PLATFORM].broker.join, "webhooks", timeout=20_000)


async def settle(broker: Any) -> None:
    """Wait until every queue is empty, so no actor (of any concern: task events also feed
    the cache, search and analytics) is still running when the worker is stopped."""
    for queue in sorted(broker.get_declared_queues()):
        await asyncio.to_thread(broker.join, queue, timeout=20_000)


async def test_task_event_is_delivered_signed(
    brokers: list[Any],
    broker_settings: Any,
    aiohttp_client: Any,
    run_worker: Any,
    receiver: Receiver,
) -> None:
    """Runs over both real brokers (Redis and RabbitMQ)."""
    app, client, auth = await setup(brokers, broker_settings, aiohttp_client, run_worker)
    created = await add_hook(client, auth, receiver.url("all"), ["*"])
    task = await add_task(client, auth, title="Ship it")

    [hit] = await receiver.wait_for(1)
    assert hit.path == "/hook/all"
    assert hit.headers["Content-Type"] == "application/json"
    assert hit.headers["X-Webhook-Event"] == "task.created"
    timestamp = hit.headers["X-Webhook-Timestamp"]
    assert abs(int(timestamp) - time.time()) < 60
    assert signed(created["secret"], hit.headers, hit.body)
    assert not signed("wrong", hit.headers, hit.body)
    body = json.loads(hit.body)
    assert set(body) == {"id", "event", "created_at", "data"}
    assert body["id"] == hit.headers["X-Webhook-Id"]
    assert body["event"] == "task.created"
    assert body["created_at"].endswith("Z")
    assert body["data"]["task"]["id"] == task["id"]
    assert body["data"]["task"]["title"] == "Ship it"
    event = await app[CONTEXT].store["events"].find_one({"type": "task.created"})
    assert body["id"] == str(event["_id"])

    await wait_delivery(app, created["id"], lambda d: d["status"] == "succeeded")
    resp = await client.get(f"{W}/{created['id']}/deliveries", headers=auth)
    assert resp.status == 200
    page = await resp.json()
    [delivery] = page["items"]
    assert page["next_cursor"] is None
    assert delivery["id"] == hit.headers["X-Webhook-Delivery"]
    assert (delivery["status"], delivery["attempts"], delivery["response_code"]) == (
        "succeeded",
        1,
        200,
    )
    assert delivery["event"] == "task.created"
    assert delivery["response_excerpt"] == "ok"
    assert delivery["last_error"] is None
    assert delivery["delivered_at"] is not None


async def test_only_subscribed_events_are_delivered(
    brokers: list[Any], make_settings: Any, aiohttp_client: Any, run_worker: Any, receiver: Receiver
) -> None:
    app, client, auth = await setup(brokers, make_settings, aiohttp_client, run_worker)
    every = await add_hook(client, auth, receiver.url("every"), ["*"])
    done = await add_hook(client, auth, receiver.url("done"), ["task.completed"])
    task = await add_task(client, auth)
    resp = await client.patch(f"/api/v1/tasks/{task['id']}", json={"status": "done"}, headers=auth)
    assert resp.status == 200
    # every: created, updated, completed; done: completed.
    await receiver.wait_for(4)
    await join(app)
    got = sorted((h.path, h.headers["X-Webhook-Event"]) for h in receiver.hits)
    assert got == [
        ("/hook/done", "task.completed"),
        ("/hook/every", "task.completed"),
        ("/hook/every", "task.created"),
        ("/hook/every", "task.updated"),
    ]
    # Another user's task events never reach this user's webhooks.
    other = await register(client)
    await add_task(client, bearer(other["access_token"]))
    await add_task(client, auth)
    await receiver.wait_for(5)
    await join(app)
    assert len(receiver.hits) == 5
    assert every["id"] != done["id"]


async def test_failing_endpoint_retries_then_dead_letters_then_redelivers(
    brokers: list[Any], make_settings: Any, aiohttp_client: Any, run_worker: Any, receiver: Receiver
) -> None:
    app, client, auth = await setup(brokers, make_settings, aiohttp_client, run_worker)
    receiver.status = 500
    receiver.reply = "x" * 5000
    hook = await add_hook(client, auth, receiver.url(), ["task.created"])
    await add_task(client, auth)

    dead = await wait_delivery(app, hook["id"], lambda d: d["status"] == "dead")
    # One attempt plus WEBHOOK_MAX_RETRIES retries, each backing off longer.
    assert dead["attempts"] == 3
    hits = await receiver.wait_for(3)
    assert len(hits) == 3
    gaps = [b.at - a.at for a, b in itertools.pairwise(hits)]
    assert gaps[0] >= 0.05
    assert gaps[1] >= 0.1
    assert len({h.headers["X-Webhook-Id"] for h in hits}) == 1
    assert len({h.body for h in hits}) == 1
    message = await wait_dead_lettered(app, dead["_id"])
    assert message["args"] == [dead["_id"], 0, dead["owner"]]

    resp = await client.get(f"{W}/{hook['id']}/deliveries", headers=auth)
    [logged] = (await resp.json())["items"]
    assert (logged["status"], logged["attempts"], logged["response_code"]) == ("dead", 3, 500)
    assert logged["last_error"] == "HTTP 500"
    assert len(logged["response_excerpt"]) == webhooks.EXCERPT_BYTES

    # The endpoint is fixed; the user asks for the delivery again.
    receiver.status = 200
    receiver.reply = "thanks"
    resp = await client.post(f"{W}/{hook['id']}/deliveries/{logged['id']}/redeliver", headers=auth)
    assert resp.status == 202, await resp.text()
    again = await resp.json()
    assert (again["status"], again["attempts"], again["redeliveries"]) == ("pending", 0, 1)

    await wait_delivery(app, hook["id"], lambda d: d["status"] == "succeeded")
    hits = await receiver.wait_for(4)
    last = hits[3]
    assert last.body == hits[0].body
    assert last.headers["X-Webhook-Id"] == hits[0].headers["X-Webhook-Id"]
    assert signed(hook["secret"], last.headers, last.body)
    resp = await client.get(f"{W}/{hook['id']}/deliveries", headers=auth)
    [logged] = (await resp.json())["items"]
    assert (logged["status"], logged["attempts"], logged["response_code"]) == ("succeeded", 1, 200)
    assert logged["response_excerpt"] == "thanks"
    await join(app)
    assert len(receiver.hits) == 4


async def test_redirects_are_not_followed(
    brokers: list[Any], make_settings: Any, aiohttp_client: Any, run_worker: Any, receiver: Receiver
) -> None:
    app, client, auth = await setup(
        brokers, make_settings, aiohttp_client, run_worker, webhook_max_retries=0
    )
    receiver.status = 302
    hook = await add_hook(client, auth, receiver.url(), ["task.created"])
    await add_task(client, auth)
    dead = await wait_delivery(app, hook["id"], lambda d: d["status"] == "dead")
    assert dead["response_code"] == 302
    assert "redirect" in dead["last_error"]
    assert dead["attempts"] == 1
    await join(app)
    assert len(receiver.hits) == 1
    assert receiver.strays == []


async def test_slow_endpoint_times_out(
    brokers: list[Any], make_settings: Any, aiohttp_client: Any, run_worker: Any, receiver: Receiver
) -> None:
    app, client, auth = await setup(
        brokers,
        make_settings,
        aiohttp_client,
        run_worker,
        webhook_max_retries=0,
        webhook_timeout=0.3,
    )
    receiver.delay = 1.5
    hook = await add_hook(client, auth, receiver.url(), ["task.created"])
    await add_task(client, auth)
    dead = await wait_delivery(app, hook["id"], lambda d: d["status"] == "dead")
    assert dead["last_error"] == "timed out after 0.3 s"
    assert dead["response_code"] is None


async def test_target_is_checked_again_at_delivery(
    brokers: list[Any], make_settings: Any, aiohttp_client: Any, receiver: Receiver
) -> None:
    """Registered while 127.0.0.1 was allow-listed; the worker's settings no longer list it,
    so the delivery is refused without a request, and dead-lettered at once."""
    app, client, auth = await setup(brokers, make_settings, aiohttp_client, None)
    hook = await add_hook(client, auth, receiver.url(), ["task.created"])
    strict = build_broker(Connections(make_settings(**{**FAST, "webhook_allow_hosts": []})))
    brokers.append(strict.broker)
    worker = Worker(strict.broker, worker_threads=2, worker_timeout=100)
    worker.start()
    try:
        await add_task(client, auth)
        dead = await wait_delivery(app, hook["id"], lambda d: d["status"] == "dead")
        await wait_dead_lettered(app, dead["_id"])
    finally:
        await settle(strict.broker)
        await asyncio.to_thread(worker.stop)
    assert "not allowed" in dead["last_error"]
    assert "127.0.0.1" not in dead["last_error"]
    assert dead["attempts"] == 1
    assert dead["response_code"] is None
    assert receiver.hits == []


async def test_duplicate_fan_out_and_delivery_messages_post_once(
    brokers: list[Any], make_settings: Any, aiohttp_client: Any, run_worker: Any, receiver: Receiver
) -> None:
    app, client, auth = await setup(
        brokers, make_settings, aiohttp_client, None, webhook_max_retries=5
    )
    hook = await add_hook(client, auth, receiver.url(), ["task.created"])
    await add_task(client, auth)
    event = await app[CONTEXT].store["events"].find_one({"type": "task.created"})
    fan_out = app[PLATFORM].actors["fan_out_webhooks"]
    # The relay sends it once; an at-least-once broker may hand it over again.
    for _ in range(2):
        await asyncio.to_thread(fan_out.send, public_event(event))
    run_worker(app)
    await receiver.wait_for(1)
    await join(app)
    delivery_id = f"{event['_id']}:{hook['id']}"
    deliver = app[PLATFORM].actors["deliver_webhook"]
    await asyncio.to_thread(deliver.send, delivery_id, 0)
    await join(app)
    assert len(receiver.hits) == 1
    docs = await app[CONTEXT].store["webhook_deliveries"].find({}).to_list()
    assert [(d["_id"], d["status"], d["attempts"]) for d in docs] == [(delivery_id, "succeeded", 1)]


async def test_deleted_webhook_gets_nothing(
    brokers: list[Any], make_settings: Any, aiohttp_client: Any, run_worker: Any, receiver: Receiver
) -> None:
    """Deleted after its delivery was created and enqueued, before any worker ran."""
    app, client, auth = await setup(brokers, make_settings, aiohttp_client, None)
    hook = await add_hook(client, auth, receiver.url(), ["*"])
    await add_task(client, auth)
    store = app[CONTEXT].store
    event = await store["events"].find_one({"type": "task.created"})
    hook_doc = await store["webhooks"].find_one({})
    delivery, _ = await webhooks.ensure_delivery(app[CONTEXT], hook_doc, public_event(event))
    deliver = app[PLATFORM].actors["deliver_webhook"]
    await asyncio.to_thread(deliver.send, delivery["_id"], 0)
    assert (await client.delete(f"{W}/{hook['id']}", headers=auth)).status == 204
    run_worker(app)
    await join(app)
    assert receiver.hits == []
    assert await store["webhook_deliveries"].count_documents({}) == 0


async def test_pinned_resolver_connects_to_the_checked_address(receiver: Receiver) -> None:
    """The host name does not exist in DNS: the connection can only have gone to the address
    the check validated, while Host still names the URL's host."""
    url = f"http://hooks.invalid:{receiver.port}/hook/pinned"
    target = Target(
        host="hooks.invalid",
        port=receiver.port,
        addresses=((int(socket.AF_INET), "127.0.0.1"),),
        allow_listed=True,
    )
    attempt = await post(url, {"Content-Type": "application/json"}, b"{}", target, 5.0)
    assert attempt.ok
    assert attempt.response_code == 200
    [hit] = receiver.hits
    assert hit.headers["Host"] == f"hooks.invalid:{receiver.port}"
    assert hit.path == "/hook/pinned"


async def test_delivery_check_uses_the_name_not_the_address(
    make_settings: Any, receiver: Receiver
) -> None:
    """``localhost`` resolves to the allow-listed 127.0.0.1, but only names on the list pass."""
    settings = make_settings(webhook_allow_hosts=["127.0.0.1"])
    hook = {
        "_id": "65f0c0ffee00000000000001",
        "url": f"http://localhost:{receiver.port}/hook/x",
        "secret": webhooks.seal_secret(settings, "65f0c0ffee00000000000001", "s"),
    }
    delivery = {"_id": "e:w", "event_id": "e", "event": "task.created", "body": "{}"}
    with pytest.raises(DeliveryRefused, match="not allowed"):
        await attempt_delivery(settings, hook, delivery)
    assert receiver.hits == []


# --- leases: a redelivered message waits for a live lease, and a lease dies with its worker --


async def pending_delivery(app: Any, client: Any, auth: dict[str, str], url: str) -> str:
    """A delivery created and marked enqueued as the fan-out does, before any worker runs
    (so the fan-out, when a worker starts, leaves it alone); its id."""
    await add_hook(client, auth, url, ["task.created"])
    await add_task(client, auth)
    ctx = app[CONTEXT]
    event = await ctx.store["events"].find_one({"type": "task.created"})
    hook_doc = await ctx.store["webhooks"].find_one({})
    delivery, _ = await webhooks.ensure_delivery(ctx, hook_doc, public_event(event))
    await webhooks.mark_enqueued(ctx, delivery["_id"])
    return str(delivery["_id"])


async def lease_to(app: Any, delivery_id: str, worker: str, *, seconds: float = 30.0) -> None:
    """Give the delivery's lease to ``worker``, as its claim would, mid-attempt."""
    now = utcnow()
    await (
        app[CONTEXT]
        .store["webhook_deliveries"]
        .update_one(
            {"_id": delivery_id},
            {
                "$set": {
                    "lease_until": now + timedelta(seconds=seconds),
                    "lease_token": "held-by-" + worker,
                    "lease_worker": worker,
                    "leased_at": now - timedelta(seconds=2),
                }
            },
        )
    )


async def beat(app: Any, worker: str, *, age_ms: int = 0) -> None:
    """Record a heartbeat of ``worker`` in the registry, ``age_ms`` ago."""
    ctx = app[CONTEXT]
    now = int(time.time() * 1000)
    await ctx.redis.zadd(registry_index(ctx.settings.redis_prefix), {worker: now - age_ms})


async def test_a_message_meeting_a_live_lease_waits_without_spending_retries(
    brokers: list[Any], make_settings: Any, aiohttp_client: Any, run_worker: Any, receiver: Receiver
) -> None:
    """Another worker, beating, holds the lease: the message waits (no retries at all are
    allowed, and it is not dead-lettered) and attempts once the lease is given back."""
    app, client, auth = await setup(
        brokers, make_settings, aiohttp_client, None, webhook_max_retries=0
    )
    delivery_id = await pending_delivery(app, client, auth, receiver.url())
    await lease_to(app, delivery_id, "peer")
    deliver = app[PLATFORM].actors["deliver_webhook"]
    await asyncio.to_thread(deliver.send, delivery_id, 0)
    run_worker(app)
    coll = app[CONTEXT].store["webhook_deliveries"]
    deadline = time.monotonic() + 3.5  # several lease waits (1 to 1.5 s each)
    while time.monotonic() < deadline:
        await beat(app, "peer")
        doc = await coll.find_one({"_id": delivery_id})
        assert (doc["status"], doc["attempts"]) == ("pending", 0)
        await asyncio.sleep(0.2)
    assert receiver.hits == []
    assert await dead_lettered(app) == []

    await webhooks.release(app[CONTEXT], delivery_id, "held-by-peer")
    done = await wait_delivery(app, _hook_of(delivery_id), lambda d: d["status"] != "pending")
    assert (done["status"], done["attempts"], done["last_error"]) == ("succeeded", 1, None)
    await join(app)
    assert len(receiver.hits) == 1
    assert await dead_lettered(app) == []


def _hook_of(delivery_id: str) -> str:
    return delivery_id.split(":", 1)[1]


@pytest.mark.parametrize("heartbeat", ["none", "stale"])
async def test_a_lease_dies_with_its_worker(
    brokers: list[Any],
    make_settings: Any,
    aiohttp_client: Any,
    run_worker: Any,
    receiver: Receiver,
    heartbeat: str,
) -> None:
    """The worker holding a 30 s lease died (its registration is gone, or its heartbeat is
    older than WORKER_HEARTBEAT_TIMEOUT_MS): the next message takes the lease over at once,
    and the interrupted attempt is counted."""
    app, client, auth = await setup(
        brokers, make_settings, aiohttp_client, None, webhook_max_retries=0
    )
    delivery_id = await pending_delivery(app, client, auth, receiver.url())
    await lease_to(app, delivery_id, "crashed")
    if heartbeat == "stale":
        await beat(app, "crashed", age_ms=app[CONTEXT].settings.worker_heartbeat_timeout_ms + 500)
    deliver = app[PLATFORM].actors["deliver_webhook"]
    began = time.monotonic()
    await asyncio.to_thread(deliver.send, delivery_id, 0)
    run_worker(app)
    done = await wait_delivery(app, _hook_of(delivery_id), lambda d: d["status"] != "pending")
    assert time.monotonic() - began < 10, "waited for the lease's time bound"
    assert (done["status"], done["attempts"], done["last_error"]) == ("succeeded", 2, None)
    assert "lease_token" not in done
    assert "lease_worker" not in done
    await join(app)
    assert len(receiver.hits) == 1
    assert await dead_lettered(app) == []


async def seed_delivery(ctx: Any, delivery_id: str = "e1:w1") -> str:
    now = utcnow()
    await ctx.store["webhook_deliveries"].insert_one(
        {
            "_id": delivery_id,
            "webhook_id": "w1",
            "owner": "u1",
            "status": "pending",
            "attempts": 0,
            "generation": 0,
            "created_at": now,
        }
    )
    return delivery_id


async def test_claim_takes_over_a_dead_workers_lease_once(ctx: Any) -> None:
    """Of many messages meeting a dead worker's lease at once, exactly one takes it over;
    a live worker's lease is left alone; a lease without a worker dies only with time."""
    key = registry_index(ctx.settings.redis_prefix)
    me = webhooks.Holder("me", key)
    delivery_id = await seed_delivery(ctx)
    lease = timedelta(seconds=30)

    first = await webhooks.claim(ctx, delivery_id, 0, lease, webhooks.Holder("w-live", key))
    assert isinstance(first, webhooks.Lease)
    assert first.delivery["lease_worker"] == "w-live"
    await ctx.redis.zadd(key, {"w-live": int(time.time() * 1000)})
    assert await webhooks.claim(ctx, delivery_id, 0, lease, me) == "busy"

    await ctx.redis.zrem(key, "w-live")  # it died (or deregistered)
    rivals = [webhooks.Holder(f"m{n}", key) for n in range(6)]
    await ctx.redis.zadd(key, {h.worker_id: int(time.time() * 1000) for h in rivals})
    won = await asyncio.gather(*(webhooks.claim(ctx, delivery_id, 0, lease, h) for h in rivals))
    leases = [c for c in won if isinstance(c, webhooks.Lease)]
    assert len(leases) == 1
    assert won.count("busy") == 5
    [taken] = leases
    assert taken.took_over == "w-live"
    assert taken.delivery["attempts"] == 1
    assert (
        taken.delivery["last_error"]
        == "interrupted: worker w-live stopped beating during the attempt"
    )

    await webhooks.release(ctx, delivery_id, taken.token)
    anonymous = await webhooks.claim(ctx, delivery_id, 0, lease, None)
    assert isinstance(anonymous, webhooks.Lease)
    assert await webhooks.claim(ctx, delivery_id, 0, lease, me) == "busy"
    await ctx.store["webhook_deliveries"].update_one(
        {"_id": delivery_id}, {"$set": {"lease_until": utcnow() - timedelta(seconds=1)}}
    )
    expired = await webhooks.claim(ctx, delivery_id, 0, lease, me)
    assert isinstance(expired, webhooks.Lease)
    assert expired.took_over == "expired"
    assert expired.delivery["attempts"] == 2


async def test_a_dead_workers_slot_is_free_again(ctx: Any) -> None:
    """A user's slots taken by a worker that stopped beating are dropped when the cap is
    reached; those of a live worker, and those naming no worker, only lapse with their ttl."""
    key = registry_index(ctx.settings.redis_prefix)
    cap = ctx.settings.webhook_max_in_flight_per_user
    ttl = timedelta(seconds=30)
    live, dead, me = (webhooks.Holder(w, key) for w in ("w-live", "w-dead", "me"))
    now = int(time.time() * 1000)
    await ctx.redis.zadd(key, {"w-live": now, "me": now})
    for n in range(cap):
        holder = dead if n % 2 else live
        token = webhooks.slot_token(holder if n < cap - 1 else None)
        assert await webhooks.take_slot(ctx, "u1", token, ttl, holder=holder)
    assert await webhooks.slots_in_use(ctx, "u1") == cap
    dead_slots = len([n for n in range(cap - 1) if n % 2])
    for _ in range(dead_slots):
        assert await webhooks.take_slot(ctx, "u1", webhooks.slot_token(me), ttl, holder=me)
    assert not await webhooks.take_slot(ctx, "u1", webhooks.slot_token(me), ttl, holder=me)
    assert not await webhooks.take_slot(ctx, "u1", "plain", ttl)
    assert await webhooks.slots_in_use(ctx, "u1") == cap


async def test_the_owners_slot_is_held_around_the_post_alone(
    brokers: list[Any],
    make_settings: Any,
    aiohttp_client: Any,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The slot is taken once the delivery is leased and given back before the attempt is
    recorded (the receiver sees it held; the delivery's reads and writes do not hold it).
    With every slot taken before a message starts, it is deferred before any claim."""
    app, client, auth = await setup(brokers, make_settings, aiohttp_client, None)
    ctx, platform = app[CONTEXT], app[PLATFORM]
    delivery_id = await pending_delivery(app, client, auth, receiver.url())
    owner = str((await ctx.store["webhook_deliveries"].find_one({"_id": delivery_id}))["owner"])
    # Each step with the requests the receiver had by then and the owner's slots in use.
    steps: list[tuple[str, int, int]] = []

    def noting(name: str) -> None:
        real = getattr(webhooks, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            steps.append((name, len(receiver.hits), await webhooks.slots_in_use(ctx, owner)))
            return await real(*args, **kwargs)

        monkeypatch.setattr(webhooks, name, call)

    for name in ("claim", "take_slot", "free_slot", "record_attempt"):
        noting(name)
    actor_ctx = ActorContext.of(ctx, platform.resources.mailer, platform.broker)
    await deliver_webhook(actor_ctx, delivery_id, 0, owner)
    # Claimed with no slot held; the slot taken, then the POST, then given back; recorded
    # with no slot held.
    assert steps == [
        ("claim", 0, 0),
        ("take_slot", 0, 0),
        ("free_slot", 1, 1),
        ("record_attempt", 1, 0),
    ]
    doc = await ctx.store["webhook_deliveries"].find_one({"_id": delivery_id})
    assert (doc["status"], doc["attempts"]) == ("succeeded", 1)

    # Every slot taken (by other deliveries' POSTs): deferred before the delivery is claimed.
    for n in range(ctx.settings.webhook_max_in_flight_per_user):
        assert await webhooks.take_slot(ctx, owner, f"other{n}", timedelta(seconds=30))
    steps.clear()
    with pytest.raises(Deferred):
        await deliver_webhook(actor_ctx, delivery_id, 1, owner)
    assert [name for name, _, _ in steps] == ["take_slot"]
