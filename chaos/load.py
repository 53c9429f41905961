"""The steady mixed load and the ledger of what every write should cause.

Several users, each with a webhook (all events) to the loopback receiver, create a task (its
title carries a word no other task has), update it, then complete it, one request after
another at a fixed pace; meanwhile a new user registers every couple of seconds. Every
request is recorded (answer, time); every acknowledged write adds its expected side effects to
the ledger: a ``task.created`` webhook and a search entry per create, a ``task.updated``
webhook per update, ``task.updated`` and ``task.completed`` per completion, a welcome email per
registration. :meth:`Load.check` then counts what is missing and what arrived twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import string
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tests.conftest import SmtpSink
from tests.e2e.test_pipeline import API, Answer, Api, Received

#: Seconds between one user's requests.
PACE_S = 0.5


@dataclass
class Request:
    """One request of the load and its outcome."""

    kind: str  # create | update | complete | register | read
    sent: float
    done: float
    status: int | None  # None: no answer (connection error or timeout)
    error: str = ""

    @property
    def ok(self) -> bool:
        """Answered 2xx."""
        return self.status is not None and 200 <= self.status < 300


@dataclass
class Expect:
    """A side effect an acknowledged write should cause."""

    kind: str  # webhook | search | email
    key: tuple[str, ...]  # (path, task_id, event) | (user, task_id, word) | (email,)
    acked: float


@dataclass
class User:
    """A user of the load, with their webhook endpoint on the receiver."""

    email: str
    token: str
    hook: str  # receiver endpoint name


@dataclass
class Outcome:
    """What the ledger check found."""

    writes_acked: int
    lost: list[str]
    duplicates: list[str]
    #: Same X-Webhook-Id, or same email Message-ID, received again (receivers dedupe on them).
    redeliveries: int
    #: (ack time, seconds until its first effect arrived, which effect), per webhook key.
    effect_lag: list[tuple[float, float, str]]


def _word() -> str:
    return "zq" + "".join(random.choices(string.ascii_lowercase, k=10))  # noqa: S311 - not a secret


@dataclass
class Load:
    """The load generator and its ledger, over one base URL."""

    base: str
    hook_url: Any  # Receiver.url
    users_n: int = 4
    register_every_s: float = 2.0
    requests: list[Request] = field(default_factory=list)
    expects: list[Expect] = field(default_factory=list)
    users: list[User] = field(default_factory=list)
    hook_names: dict[str, str] = field(default_factory=dict)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _client: Api | None = None

    async def setup(self, hooks: list[str] | None = None) -> None:
        """Register the users and their webhooks (``hooks``: endpoint names, default
        ``u0``, ``u1``…)."""
        self._client = Api(self.base)
        names = hooks or [f"u{i}" for i in range(self.users_n)]
        for name in names:
            email = f"{name}-{uuid.uuid4().hex[:8]}@example.com"
            answer = await self._client.call(
                "POST",
                f"{API}/auth/register",
                body={"email": email, "password": "correct horse 1", "name": name},
            )
            assert answer.status == 201, answer
            token = answer.json()["access_token"]
            self.expects.append(Expect("email", (email,), time.monotonic()))
            hook = await self._client.call(
                "POST",
                f"{API}/webhooks",
                token=token,
                body={"url": self.hook_url(name), "events": ["*"]},
            )
            assert hook.status == 201, hook
            self.hook_names[hook.json()["id"]] = name
            self.users.append(User(email, token, name))

    async def _call(self, kind: str, method: str, path: str, **kw: Any) -> Answer | None:
        assert self._client is not None
        sent = time.monotonic()
        try:
            answer = await self._client.call(method, path, **kw)
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.requests.append(Request(kind, sent, time.monotonic(), None, repr(exc)[:200]))
            return None
        error = "" if answer.ok else f"{answer.status} {answer.text[:200]}"
        self.requests.append(Request(kind, sent, time.monotonic(), answer.status, error))
        return answer

    async def _user_loop(self, user: User) -> None:
        while not self._stop.is_set():
            word = _word()
            created = await self._call(
                "create",
                "POST",
                f"{API}/tasks",
                token=user.token,
                body={"title": f"chaos {word}", "priority": "low"},
            )
            if created is None or created.status != 201:
                await asyncio.sleep(PACE_S)
                continue
            task_id = created.json()["id"]
            now = time.monotonic()
            self.expects.append(Expect("webhook", (user.hook, task_id, "task.created"), now))
            self.expects.append(Expect("search", (user.token, task_id, word), now))
            for kind, body in (("update", {"priority": "high"}), ("complete", {"status": "done"})):
                await asyncio.sleep(PACE_S)
                if self._stop.is_set():
                    return
                answer = await self._call(
                    kind, "PATCH", f"{API}/tasks/{task_id}", token=user.token, body=body
                )
                if answer is not None and answer.status == 200:
                    now = time.monotonic()
                    self.expects.append(
                        Expect("webhook", (user.hook, task_id, "task.updated"), now)
                    )
                    if kind == "complete":
                        self.expects.append(
                            Expect("webhook", (user.hook, task_id, "task.completed"), now)
                        )
            await asyncio.sleep(PACE_S)

    async def _register_loop(self) -> None:
        while not self._stop.is_set():
            await asyncio.sleep(self.register_every_s)
            email = f"new-{uuid.uuid4().hex[:10]}@example.com"
            answer = await self._call(
                "register",
                "POST",
                f"{API}/auth/register",
                body={"email": email, "password": "correct horse 1", "name": "New"},
            )
            if answer is not None and answer.status == 201:
                self.expects.append(Expect("email", (email,), time.monotonic()))

    async def run(self, seconds: float) -> None:
        """Run the load for ``seconds`` (or until :meth:`stop`)."""
        loops = [asyncio.create_task(self._user_loop(u)) for u in self.users]
        loops.append(asyncio.create_task(self._register_loop()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        self._stop.set()
        await asyncio.gather(*loops)

    def stop(self) -> None:
        """Stop the load after the requests in flight."""
        self._stop.set()

    def failed(self, since: float = 0.0, until: float = float("inf")) -> list[Request]:
        """Requests sent in [since, until] that were not answered 2xx."""
        return [r for r in self.requests if not r.ok and since <= r.sent <= until]

    # --- the ledger ---------------------------------------------------------------------

    def _webhook_state(
        self, received: list[Received]
    ) -> tuple[Counter[tuple[str, ...]], int, dict[tuple[str, ...], float]]:
        ids: Counter[str] = Counter()
        distinct: Counter[tuple[str, ...]] = Counter()
        first: dict[tuple[str, ...], float] = {}
        for req in received:
            hook_id = req.headers.get("X-Webhook-Id", "")
            ids[hook_id] += 1
            if ids[hook_id] > 1:
                continue
            body = req.json()
            task = body.get("data", {}).get("task", {})
            key = (req.path.lstrip("/"), str(task.get("id")), str(body.get("event")))
            distinct[key] += 1
            first.setdefault(key, req.at)
        redelivered = sum(n - 1 for n in ids.values())
        return distinct, redelivered, first

    def first_arrivals(self, received: list[Received]) -> dict[tuple[str, ...], float]:
        """When each (endpoint, task, event) first arrived."""
        return self._webhook_state(received)[2]

    def missing(
        self, received: list[Received], smtp: SmtpSink, only: set[str] | None = None
    ) -> int:
        """How many expected webhooks and emails have not arrived yet (search is checked by
        :meth:`check`, it costs requests)."""
        distinct, _, _ = self._webhook_state(received)
        expected = Counter(
            e.key
            for e in self.expects
            if e.kind == "webhook" and (only is None or e.key[0] in only)
        )
        mails: Counter[tuple[str, ...]] = Counter((str(m["To"]),) for m in smtp.messages)
        want_mail = Counter(e.key for e in self.expects if e.kind == "email")
        return sum(max(0, n - distinct[k]) for k, n in expected.items()) + sum(
            max(0, n - mails[k]) for k, n in want_mail.items()
        )

    async def check(
        self, received: list[Received], smtp: SmtpSink, only: set[str] | None = None
    ) -> Outcome:
        """Compare the ledger with what arrived. ``only``: the webhook endpoints to count
        (others, e.g. a failing receiver, are checked by the scenario)."""
        assert self._client is not None
        distinct, redelivered, first = self._webhook_state(received)
        lost: list[str] = []
        dups: list[str] = []
        lag: list[tuple[float, float, str]] = []
        want = Counter(e.key for e in self.expects if e.kind == "webhook")
        acked_at: dict[tuple[str, ...], float] = {}
        for e in self.expects:
            if e.kind == "webhook":
                acked_at[e.key] = e.acked  # the last acknowledgement of that key
        for key, n in want.items():
            if only is not None and key[0] not in only:
                continue
            got = distinct[key]
            if got < n:
                lost.append(f"webhook {key} {got}/{n}")
            elif got > n:
                dups.append(f"webhook {key} {got}/{n}")
            if key in first:
                lag.append(
                    (acked_at[key], max(0.0, first[key] - acked_at[key]), f"{key[2]} {key[1]}")
                )
        # A resent email keeps its stable Message-ID: mail systems drop it (like a webhook
        # redelivery with the same X-Webhook-Id); a second Message-ID is a visible duplicate.
        ids = Counter((m["To"], m["Message-ID"]) for m in smtp.messages)
        mails = Counter(to for to, _ in ids)
        redelivered += sum(n - 1 for n in ids.values())
        for e in self.expects:
            if e.kind == "email":
                got = mails[e.key[0]]
                if got == 0:
                    lost.append(f"email {e.key[0]}")
                elif got > 1:
                    dups.append(f"email {e.key[0]} x{got}")
        for e in self.expects:
            if e.kind != "search":
                continue
            token, task_id, word = e.key
            answer = await self._client.call("GET", f"{API}/search?q={word}&limit=50", token=token)
            if answer.status != 200:
                lost.append(f"search {task_id}: {answer.status}")
                continue
            hits = [h["task"]["id"] for h in answer.json()["items"]]
            if hits.count(task_id) == 0:
                lost.append(f"search {task_id}")
            elif hits.count(task_id) > 1 or len(hits) > 1:
                dups.append(f"search {task_id} {hits}")
        acked = sum(1 for r in self.requests if r.ok and r.kind != "read")
        return Outcome(acked, lost, dups, redelivered, lag)

    async def close(self) -> None:
        """Close the HTTP client."""
        if self._client is not None:
            await self._client.close()
