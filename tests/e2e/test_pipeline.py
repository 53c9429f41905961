"""The whole pipeline as real processes: ``taskmanager web`` and ``taskmanager worker`` over the
suite's MongoDB (SecantusDB) and a real Redis, with a real SMTP sink and a local webhook
receiver (all on loopback).

- A task created through the API reaches the owner's webhook, signed, and is findable by
  prefix search within 2 s of the create's answer; other users' tasks never appear.
- Redis stopped for about 10 s while the API takes writes: every write either succeeds or
  fails cleanly (problem+json), and every acknowledged write's side effects (webhooks, search,
  the welcome email) arrive once Redis is back, each event delivered exactly once.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
import string
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from cli.embedded import PrivateRedis, free_port
from config.settings import Settings
from tests.conftest import SmtpSink, eventually
from tests.e2e.helpers import Proc, deployed_env, start, wait_http

pytestmark = pytest.mark.timeout(180)

API = "/api/v1"
#: A production-grade secret: 40 characters, not a placeholder.
SECRET = "e2e-pipeline-" + "s" * 27
#: The issue's promise: a created task is findable by prefix search within this (seconds).
SEARCH_DEADLINE = 2.0
#: How long side effects may take to arrive once the processes are up (or Redis is back).
EFFECTS_TIMEOUT = 45.0
#: Once Redis is back, every acknowledged write's effects arrive within this (seconds): the
#: relay retries at most every 4 s and Dramatiq restarts a consumer after 3 s. A relay that sat
#: out its 30 s claim lease on events it failed to enqueue would miss it.
RECOVERY_DEADLINE = 20.0
#: No request of the test may take longer than this: a hang is a failure.
CLIENT_TIMEOUT = 10.0
OUTAGE_SECONDS = 10.0
WRITES_PER_SECOND = 5


# --- the webhook receiver -------------------------------------------------------------------


@dataclass
class Received:
    """One request the receiver got."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        """The body, parsed."""
        return json.loads(self.body)


@dataclass
class Receiver:
    """An HTTP server on loopback recording every POST (headers and raw body); answers 200."""

    requests: list[Received] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None

    async def start(self) -> Receiver:
        """Listen on a free loopback port."""
        app = web.Application()
        app.router.add_post("/{name}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    def url(self, name: str) -> str:
        """The URL of one of the receiver's endpoints."""
        return f"http://127.0.0.1:{self.port}/{name}"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append(Received(request.path, dict(request.headers), body, time.monotonic()))
        return web.Response(text="thanks")

    def at(self, name: str) -> list[Received]:
        """The requests one endpoint got."""
        return [r for r in self.requests if r.path == f"/{name}"]

    async def close(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()


@asynccontextmanager
async def receiver() -> AsyncIterator[Receiver]:
    """A running :class:`Receiver`, stopped afterwards."""
    rcv = await Receiver().start()
    try:
        yield rcv
    finally:
        await rcv.close()


def assert_signed(secret: str, req: Received) -> None:
    """The receiver's check, written out independently of the product's code."""
    ts = req.headers["X-Webhook-Timestamp"]
    mac = hmac.new(secret.encode(), ts.encode() + b"." + req.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest("sha256=" + mac, req.headers["X-Webhook-Signature"]), req
    assert abs(time.time() - int(ts)) <= 300, f"stale timestamp {ts}"


def task_of(req: Received) -> dict[str, Any]:
    """The task a delivery names (``data.task``)."""
    task: dict[str, Any] = req.json()["data"]["task"]
    return task


# --- the processes --------------------------------------------------------------------------


@dataclass
class Services:
    """The web and worker processes under test, and the web's base URL."""

    web: Proc
    worker: Proc
    base: str

    def describe(self) -> str:
        """Both processes' command, state and output, for failure messages."""
        return f"--- web\n{self.web.describe()}\n--- worker\n{self.worker.describe()}"


def service_env(settings: Settings, redis_url: str, smtp: SmtpSink) -> dict[str, str]:
    """What a deployment would set; the test's own database and Redis prefix."""
    return deployed_env(
        settings,
        JWT_SECRET=SECRET,
        REDIS_URL=redis_url,
        SMTP_URL=smtp.url,
        WEBHOOK_ALLOW_HOSTS="127.0.0.1",
        # The budget is not under test here; polling must never meet a 429.
        RATE_LIMIT="100000/minute",
    )


@asynccontextmanager
async def services(env: dict[str, str], cwd: Path) -> AsyncIterator[Services]:
    """``taskmanager web`` (ready) and ``taskmanager worker --processes 1 --threads 4``."""
    port = free_port()
    web_proc = start(["web", "--port", str(port)], env, cwd=str(cwd))
    worker = start(["worker", "--processes", "1", "--threads", "4"], env, cwd=str(cwd))
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_http(web_proc, f"{base}/readyz", timeout=60)
        yield Services(web_proc, worker, base)
    finally:
        for proc in (web_proc, worker):
            await asyncio.to_thread(proc.close)


@dataclass
class Answer:
    """An HTTP answer, read whole."""

    status: int
    content_type: str
    text: str

    def json(self) -> Any:
        """The body, parsed."""
        return json.loads(self.text)

    @property
    def ok(self) -> bool:
        """A 2xx."""
        return 200 <= self.status < 300


class Api:
    """A client of the web process; every request is bounded by :data:`CLIENT_TIMEOUT`."""

    def __init__(self, base: str):
        self.http = aiohttp.ClientSession(
            base_url=base, timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
        )

    async def call(
        self, method: str, path: str, *, token: str | None = None, body: Any = None
    ) -> Answer:
        """Send one request and read its answer."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.http.request(method, path, json=body, headers=headers) as resp:
            return Answer(resp.status, resp.content_type, await resp.text())

    async def register(self, email: str, name: str = "Pat") -> dict[str, Any]:
        """Register; returns the token-pair body."""
        answer = await self.call(
            "POST",
            f"{API}/auth/register",
            body={"email": email, "password": "correct horse 1", "name": name},
        )
        assert answer.status == 201, answer
        body: dict[str, Any] = answer.json()
        return body

    async def create_task(self, token: str, title: str) -> dict[str, Any]:
        """Create a task; returns it."""
        answer = await self.call("POST", f"{API}/tasks", token=token, body={"title": title})
        assert answer.status == 201, answer
        task: dict[str, Any] = answer.json()
        return task

    async def add_webhook(self, token: str, url: str, events: list[str]) -> dict[str, Any]:
        """Register a webhook; returns the answer (with its secret)."""
        answer = await self.call(
            "POST", f"{API}/webhooks", token=token, body={"url": url, "events": events}
        )
        assert answer.status == 201, answer
        hook: dict[str, Any] = answer.json()
        assert hook["secret"]
        return hook

    async def search_ids(self, token: str, q: str) -> list[str]:
        """The ids of the tasks ``GET /search?q=`` answers (at most 50)."""
        answer = await self.call("GET", f"{API}/search?q={q}&limit=50", token=token)
        assert answer.status == 200, answer
        return [hit["task"]["id"] for hit in answer.json()["items"]]

    async def deliveries(self, token: str, webhook_id: str) -> list[dict[str, Any]]:
        """A webhook's delivery log."""
        answer = await self.call(
            "GET", f"{API}/webhooks/{webhook_id}/deliveries?limit=200", token=token
        )
        assert answer.status == 200, answer
        items: list[dict[str, Any]] = answer.json()["items"]
        return items

    async def close(self) -> None:
        """Close the session."""
        await self.http.close()


@asynccontextmanager
async def api(base: str) -> AsyncIterator[Api]:
    """An :class:`Api` client, closed afterwards."""
    client = Api(base)
    try:
        yield client
    finally:
        await client.close()


def distinctive_word() -> str:
    """A word no other task of the test has (letters only: one search word)."""
    return "zq" + "".join(random.choices(string.ascii_lowercase, k=10))


def mailed_to(smtp: SmtpSink, email: str) -> int:
    """How many messages the sink got for ``email``."""
    return sum(1 for m in smtp.messages if m["To"] == email)


# --- the happy path -------------------------------------------------------------------------


async def test_task_reaches_webhook_and_search(
    make_settings: Any, redis_url: str, smtp: SmtpSink, tmp_path: Path
) -> None:
    settings = make_settings()  # own database and Redis prefix, removed after the test
    env = service_env(settings, redis_url, smtp)
    word = distinctive_word()
    prefix = word[:6]
    async with receiver() as rcv, services(env, tmp_path) as svc, api(svc.base) as client:
        email_a = f"a-{uuid.uuid4().hex[:8]}@example.com"
        a = await client.register(email_a, name="Ann")
        b = await client.register(f"b-{uuid.uuid4().hex[:8]}@example.com", name="Bob")
        token_a, token_b = a["access_token"], b["access_token"]

        async def welcomed() -> bool:
            return mailed_to(smtp, email_a) == 1

        # Also proves the worker is up, so the timings below are not its start-up.
        await eventually(
            welcomed, timeout=EFFECTS_TIMEOUT, what="A's welcome email", describe=svc.describe
        )
        [welcome] = [m for m in smtp.messages if m["To"] == email_a]
        assert "Hello Ann" in welcome.get_payload()

        hook = await client.add_webhook(token_a, rcv.url("a"), ["task.created", "task.updated"])
        task_a = await client.create_task(token_a, f"Plan the {word} launch")
        acked = time.monotonic()

        async def a_finds_it() -> bool:
            return task_a["id"] in await client.search_ids(token_a, prefix)

        await eventually(
            a_finds_it, timeout=SEARCH_DEADLINE, what="A's task in search", describe=svc.describe
        )
        searchable_after = time.monotonic() - acked
        assert searchable_after < SEARCH_DEADLINE

        async def posted() -> list[Received]:
            return rcv.at("a")

        [req] = await eventually(
            posted, timeout=EFFECTS_TIMEOUT, what="the webhook", describe=svc.describe
        )
        webhook_after = req.at - acked
        assert req.headers["X-Webhook-Event"] == "task.created"
        assert req.headers["Content-Type"].startswith("application/json")
        assert_signed(hook["secret"], req)
        payload = req.json()
        assert set(payload) == {"id", "event", "created_at", "data"}
        assert payload["id"] == req.headers["X-Webhook-Id"]
        assert payload["event"] == "task.created"
        assert task_of(req)["id"] == task_a["id"]
        assert task_of(req)["title"] == f"Plan the {word} launch"
        # A signature made with any other secret does not verify.
        with pytest.raises(AssertionError):
            assert_signed(hook["secret"] + "x", req)

        # B's task with the same word: B finds only theirs, A never sees it.
        hook_b = await client.add_webhook(token_b, rcv.url("b"), ["task.created"])
        task_b = await client.create_task(token_b, f"{word} for Bob")
        b_acked = time.monotonic()

        async def b_finds_it() -> list[str]:
            found = await client.search_ids(token_b, prefix)
            return found if task_b["id"] in found else []

        found_b = await eventually(
            b_finds_it, timeout=SEARCH_DEADLINE, what="B's task in search", describe=svc.describe
        )
        b_searchable_after = time.monotonic() - b_acked
        assert found_b == [task_b["id"]]
        for _ in range(6):
            assert await client.search_ids(token_a, prefix) == [task_a["id"]]
            assert await client.search_ids(token_b, prefix) == [task_b["id"]]
            await asyncio.sleep(0.2)

        async def logged() -> list[dict[str, Any]]:
            items = await client.deliveries(token_a, hook["id"])
            return items if items and items[0]["status"] == "succeeded" else []

        [delivery] = await eventually(
            logged, timeout=EFFECTS_TIMEOUT, what="the delivery log", describe=svc.describe
        )
        assert delivery["event"] == "task.created"
        assert delivery["event_id"] == req.headers["X-Webhook-Id"]
        assert delivery["attempts"] == 1
        assert delivery["response_code"] == 200

        # B's event went to B's webhook only: the fan-out that posted it to B found no other.
        async def b_posted() -> list[Received]:
            return rcv.at("b")

        [req_b] = await eventually(
            b_posted, timeout=EFFECTS_TIMEOUT, what="B's webhook", describe=svc.describe
        )
        assert_signed(hook_b["secret"], req_b)
        assert task_of(req_b)["id"] == task_b["id"]
        assert rcv.at("a") == [req]
        assert len(await client.deliveries(token_a, hook["id"])) == 1
        print(
            f"\ncreate->searchable {searchable_after:.3f}s (B: {b_searchable_after:.3f}s), "
            f"create->webhook {webhook_after:.3f}s"
        )


# --- Redis goes away while the API takes writes ---------------------------------------------


@dataclass
class Write:
    """One write made during the outage, and how it was answered."""

    kind: str  # "create" | "patch" | "register"
    sent_at: float
    answer: Answer | None = None
    error: str | None = None
    task_id: str | None = None
    title: str | None = None
    email: str | None = None

    @property
    def acknowledged(self) -> bool:
        """The API said it was done."""
        return self.answer is not None and self.answer.ok


def assert_clean(write: Write) -> None:
    """2xx, or a problem+json 5xx; never a hang, a bare traceback or another failure."""
    assert write.error is None, f"{write.kind}: {write.error}"
    assert write.answer is not None
    answer = write.answer
    assert "Traceback" not in answer.text, answer
    if answer.ok:
        return
    assert answer.status >= 500, answer
    assert answer.content_type == "application/problem+json", answer
    problem = answer.json()
    assert problem["status"] == answer.status, answer
    assert problem["title"], answer


async def test_redis_outage_with_processes(
    make_settings: Any, smtp: SmtpSink, tmp_path: Path
) -> None:
    redis_server = PrivateRedis().start()
    try:
        settings = make_settings(redis_url=redis_server.url)
        env = service_env(settings, redis_server.url, smtp)
        word = distinctive_word()
        async with (
            receiver() as rcv,
            services(env, tmp_path) as svc,
            api(svc.base) as client,
        ):
            await _outage_scenario(client, svc, rcv, smtp, redis_server, word)
    finally:
        redis_server.stop()


async def _outage_scenario(
    client: Api,
    svc: Services,
    rcv: Receiver,
    smtp: SmtpSink,
    redis_server: PrivateRedis,
    word: str,
) -> None:
    email = f"u-{uuid.uuid4().hex[:8]}@example.com"
    user = await client.register(email)
    token = user["access_token"]
    hook = await client.add_webhook(token, rcv.url("u"), ["task.created", "task.updated"])
    first = await client.create_task(token, f"{word} before")

    async def before_effects() -> bool:
        return (
            mailed_to(smtp, email) == 1
            and len(rcv.at("u")) == 1
            and first["id"] in await client.search_ids(token, word)
        )

    await eventually(
        before_effects,
        timeout=EFFECTS_TIMEOUT,
        what="the pre-outage effects",
        describe=svc.describe,
    )

    # --- Redis stops; writes keep coming at a modest rate, each on its own schedule.
    await asyncio.to_thread(redis_server.stop)
    stopped = time.monotonic()
    created: list[str] = [first["id"]]
    writes: list[Write] = []
    readiness: list[Answer] = []

    async def run(write: Write, method: str, path: str, body: Any, auth: bool = True) -> None:
        try:
            write.answer = await client.call(method, path, token=token if auth else None, body=body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            write.error = repr(exc)
        if write.acknowledged and write.kind == "create":
            write.task_id = write.answer.json()["id"] if write.answer else None
            assert write.task_id
            created.append(write.task_id)

    pending: list[asyncio.Task[None]] = []
    count = int(OUTAGE_SECONDS * WRITES_PER_SECOND)
    for i in range(count):
        await asyncio.sleep(max(0.0, stopped + i / WRITES_PER_SECOND - time.monotonic()))
        if i == count // 4:
            w = Write("register", time.monotonic(), email=f"d-{uuid.uuid4().hex[:8]}@example.com")
            body: Any = {"email": w.email, "password": "correct horse 1", "name": "Dee"}
            pending.append(
                asyncio.create_task(run(w, "POST", f"{API}/auth/register", body, auth=False))
            )
        elif i % 2 == 0:
            w = Write("create", time.monotonic(), title=f"{word} made {i}")
            pending.append(asyncio.create_task(run(w, "POST", f"{API}/tasks", {"title": w.title})))
        else:
            target = created[-1]
            w = Write("patch", time.monotonic(), task_id=target, title=f"{word} changed {i}")
            pending.append(
                asyncio.create_task(run(w, "PATCH", f"{API}/tasks/{target}", {"title": w.title}))
            )
        writes.append(w)
        if i % 10 == 5:
            readiness.append(await client.call("GET", "/readyz"))
    await asyncio.gather(*pending)
    await asyncio.sleep(max(0.0, stopped + OUTAGE_SECONDS - time.monotonic()))
    outage = time.monotonic() - stopped

    for write in writes:
        assert_clean(write)
    for ready in readiness:
        assert ready.status == 503, ready
        assert ready.content_type == "application/problem+json", ready
        assert "redis" in ready.json()["detail"], ready
        assert "mongodb" not in ready.json()["detail"], ready
    assert readiness

    acked = [w for w in writes if w.acknowledged]
    made = [w for w in acked if w.kind == "create"]
    patched = [w for w in acked if w.kind == "patch"]
    [registered] = [w for w in writes if w.kind == "register"]
    # The product promises writes succeed without Redis; at the least some of each kind must
    # have, or the checks below would prove nothing.
    assert made and patched and registered.acknowledged, [
        (w.kind, w.answer and w.answer.status) for w in writes
    ]

    # --- Redis returns (empty: the private server keeps nothing on disk).
    # On the same port: the processes were configured with its URL.
    await asyncio.to_thread(redis_server.start)
    restarted = time.monotonic()

    created_ids = {first["id"], *(w.task_id for w in made)}
    expected_titles = {(w.task_id, w.title) for w in patched}

    def deliveries_of(event: str) -> list[Received]:
        return [r for r in rcv.at("u") if r.headers.get("X-Webhook-Event") == event]

    async def all_arrived() -> bool:
        got_created = {task_of(r)["id"] for r in deliveries_of("task.created")}
        got_updated = {
            (task_of(r)["id"], task_of(r)["title"]) for r in deliveries_of("task.updated")
        }
        return (
            created_ids <= got_created
            and expected_titles <= got_updated
            and mailed_to(smtp, registered.email or "") == 1
        )

    await eventually(
        all_arrived,
        timeout=RECOVERY_DEADLINE,
        what="every acknowledged write's effects",
        describe=svc.describe,
    )
    delivered_after = time.monotonic() - restarted

    async def all_searchable() -> bool:
        return created_ids <= set(await client.search_ids(token, word))

    remaining = max(1.0, RECOVERY_DEADLINE - (time.monotonic() - restarted))
    await eventually(
        all_searchable, timeout=remaining, what="search to catch up", describe=svc.describe
    )
    searchable_after = time.monotonic() - restarted

    await wait_http(svc.web, f"{svc.base}/readyz", status=200, timeout=10)

    # Exactly once per event: the log shows every delivery succeeded at its first attempt
    # (nothing more will be sent), and the receiver saw each event id once.
    async def settled() -> list[dict[str, Any]]:
        items = await client.deliveries(token, hook["id"])
        done = len(items) == len(rcv.at("u")) and all(d["status"] == "succeeded" for d in items)
        return items if done else []

    log = await eventually(
        settled, timeout=EFFECTS_TIMEOUT, what="the delivery log", describe=svc.describe
    )
    received = rcv.at("u")
    ids = [r.headers["X-Webhook-Id"] for r in received]
    assert len(ids) == len(set(ids)), Counter(ids).most_common(3)
    assert {d["event_id"] for d in log} == set(ids)
    assert all(d["attempts"] == 1 and d["response_code"] == 200 for d in log), log
    for req in received:
        assert_signed(hook["secret"], req)
        assert req.json()["id"] == req.headers["X-Webhook-Id"]
    creations = Counter(task_of(r)["id"] for r in deliveries_of("task.created"))
    assert set(creations.values()) == {1}, creations
    assert creations[first["id"]] == 1
    assert mailed_to(smtp, email) == 1
    updates = Counter(
        (task_of(r)["id"], task_of(r)["title"]) for r in deliveries_of("task.updated")
    )
    assert set(updates.values()) <= {1}, updates

    statuses = Counter(w.answer.status for w in writes if w.answer is not None)
    print(
        f"\noutage {outage:.1f}s, writes {dict(statuses)}, "
        f"readyz during outage {[r.status for r in readiness]}; after Redis returned: "
        f"webhooks+email {delivered_after:.2f}s, searchable {searchable_after:.2f}s"
    )
