"""Memory over a soak: every process of the platform under a steady mixed load, its RSS
sampled throughout (``python -m bench soak --seconds 600``).

What runs (loopback only, bounded by ``--seconds``, stopped here): SecantusDB in memory and
Redis (the machine's under a unique key prefix, else a private one; every key deleted at the
end); TWO ``taskmanager web`` processes, ONE ``taskmanager worker --processes 1 --threads 8``
and ONE ``taskmanager scheduler``. The load, open loop at ``--rate`` requests/s spread over
both web processes and several users: create, update and delete tasks, read the list, a
filtered page, one task, stats, search and activity, and the other endpoints a user calls:
notifications (listed and read), profile (read and changed), analytics, webhooks (listed, a
spare one created, its deliveries read, deleted), deliveries, bulk changes, sign-in with
refresh and sign-out on a login of its own, and an admin's reads (queues, dead letters,
workers, health, schedules, overview, history, backups). Left out on purpose: redelivering a
webhook (a second delivery by design, which the exactly-once ledger would count) and the
operators' writes (pausing queues, purging dead letters: chaos/ covers them). Every write causes
the real side effects (cache refresh, search entry, analytics fold, webhook fan-out) in the
worker; every user has a webhook (all task events) to a receiver in this process, and the
emails (welcome, due soon) go to an SMTP sink in this process.

The ledger, checked at the end against the system of record once the outbox has settled (every
event sent, every actor it fed finished; at most ``--drain-timeout`` seconds): each task event
of the soak's users delivered to its webhook exactly once (by ``X-Webhook-Id``), each user's
welcome email exactly once, each task's search entry at the task's version (a deleted task's a
tombstone), and the analytics counters equal to the events they count (created, completed,
deleted; the guard of each fold exactly once). Then it fires the two scheduled jobs whose
effects it can account for (``taskmanager run-job``; the scheduler fired them on their own
schedule during the soak too) and checks them: the ``analytics-rollup``'s per-day figures equal
the counters; and ``due-soon-reminders``: a quarter of the tasks are created due within the
next 1-20 hours, every open one due in the default 24 h window has its reminder recorded, each
recorded reminder is in exactly one email to its owner and one in-app notification, and no
email reminds of anything unrecorded.

Reported per process: RSS after the warm-up (the first ``--warmup-share`` of the soak), at the
end and the peak; growth = end / after-warm-up - 1. Targets: growth <= 10 %, RSS <= 200 MB.
Also: requests by status class (a 5xx is an error), and error lines in the logs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from pymongo import AsyncMongoClient

from bench.api import API, PASSWORD, SECRET, WORDS, task_body
from bench.procs import (
    Child,
    Services,
    children,
    event_settled,
    product_env,
    publish,
    rss_mb,
    taskmanager_exe,
    wait_http,
)
from cli.embedded import free_port
from core import search
from core.analytics import counted_now
from core.events import TASK_EVENT_TYPES
from core.notifications import due_key
from tests.conftest import SmtpSink, serving
from tests.e2e.test_pipeline import Receiver

RESULTS = Path(__file__).resolve().parent / "results"
ADMIN_EMAIL = "soak-admin@example.com"
GROWTH_TARGET = 0.10
RSS_TARGET_MB = 200.0
#: (weight, kind) of the mixed load.
MIX = (
    (15, "create"),
    (8, "update"),
    (2, "delete"),
    (20, "list"),
    (8, "list_todo"),
    (12, "get"),
    (15, "stats"),
    (10, "search"),
    (10, "activity"),
    (3, "notifications"),
    (2, "me"),
    (2, "analytics"),
    (2, "webhooks"),
    (2, "deliveries"),
    (2, "bulk"),
    (1, "patch_me"),
    (1, "read_notification"),
    (1, "session"),
    (1, "webhook_cycle"),
    (3, "admin"),
)
#: The operator reads of the ``admin`` kind, in turn (the operator's writes, such as pausing a
#: queue or purging dead letters, would change what the ledger expects: chaos/ covers them).
ADMIN_READS = (
    "/admin/queues",
    "/admin/workers",
    "/admin/health",
    "/admin/schedules",
    "/admin/overview",
    "/admin/history",
    "/admin/backups",
    "/admin/queues/webhooks/dead",
)


class Soak:
    """One soak run."""

    def __init__(
        self,
        seconds: float,
        rate: float,
        interval: float,
        warmup_share: float,
        drain_timeout: float = 180.0,
    ):
        self.seconds = seconds
        self.drain_timeout = drain_timeout
        self.emails: list[str] = []
        self.acked_creates = 0
        self.user_ids: list[str] = []
        self.ledger: dict[str, Any] = {}
        self.rate = rate
        self.interval = interval
        self.warmup_share = warmup_share
        self.procs: dict[str, Child] = {}
        self.samples: dict[str, list[tuple[float, float]]] = {}
        self.statuses: Counter[str] = Counter()
        self.by_kind: Counter[str] = Counter()
        self.admin_auth: dict[str, str] = {}
        self.spare_hook_url = ""

    def note(self, text: str) -> None:
        """Progress on stderr."""
        print(f"[bench soak] {text}", file=sys.stderr, flush=True)

    def pids(self) -> dict[str, int]:
        """The processes sampled: each web, the worker's parent and worker process, the
        scheduler."""
        out = {name: child.pid for name, child in self.procs.items() if child.alive()}
        worker = self.procs.get("worker")
        if worker is not None:
            for i, pid in enumerate(children(worker.pid)):
                out[f"worker process {i + 1}"] = pid
            out["worker (parent)"] = out.pop("worker")
        return out

    def sample(self, t: float) -> None:
        """Note every process's RSS now."""
        for name, pid in self.pids().items():
            try:
                mb = rss_mb(pid)[0]
            except OSError:
                continue
            if mb > 0:  # 0: a helper process exiting (no address space left)
                self.samples.setdefault(name, []).append((round(t, 1), mb))

    async def run(self) -> dict[str, Any]:
        """Start everything, soak, sample, check the ledger, stop."""
        receiver = await Receiver().start()
        try:
            with serving(SmtpSink(free_port())) as smtp:
                return await self._run(receiver, smtp)
        finally:
            await receiver.close()

    async def _run(self, receiver: Receiver, smtp: SmtpSink) -> dict[str, Any]:
        svc = Services.start()
        started = time.monotonic()
        try:
            env = product_env(
                svc,
                SECRET,
                WORKER_METRICS_PORT=str(free_port()),  # never another run's port
                SMTP_URL=smtp.url,
                WEBHOOK_ALLOW_HOSTS="127.0.0.1",
                ADMIN_EMAIL=ADMIN_EMAIL,
                ADMIN_PASSWORD=PASSWORD,
            )
            ports = [free_port(), free_port()]
            for i, port in enumerate(ports):
                self.procs[f"web {i + 1}"] = svc.spawn(
                    f"web{i}", [taskmanager_exe(), "web", "--port", str(port)], env
                )
            worker_args = [taskmanager_exe(), "worker", "--processes", "1", "--threads", "8"]
            self.procs["worker"] = svc.spawn("worker", worker_args, env)
            self.procs["scheduler"] = svc.spawn("scheduler", [taskmanager_exe(), "scheduler"], env)
            for i, port in enumerate(ports):
                await wait_http(self.procs[f"web {i + 1}"], f"http://127.0.0.1:{port}/readyz", 60)
            await asyncio.sleep(2.0)  # the worker and scheduler finish importing
            self.note(f"soaking for {self.seconds:g} s at {self.rate:g} requests/s")
            await self.load(ports, receiver.url("hook"))
            client: AsyncMongoClient[Any] = AsyncMongoClient(svc.mongo.url, tz_aware=True)
            try:
                db = client[svc.db]
                settled = await self.settle(db)
                self.ledger = await self.check(db, receiver, smtp, settled)
                fired_at = datetime.now(UTC)
                jobs = {job: await self.fire(env, db, job) for job in SCHEDULED}
                self.ledger["scheduled"] = await self.check_scheduled(db, smtp, fired_at, jobs)
                self.ledger["pass"] = self.ledger["pass"] and self.ledger["scheduled"]["pass"]
            finally:
                await client.close()
            dead = [name for name, child in self.procs.items() if not child.alive()]
            logs = {
                name: [ln for ln in child.output().splitlines() if '"level": "error"' in ln][-3:]
                for name, child in self.procs.items()
            }
        finally:
            svc.stop()
        return self.summary(dead, logs, time.monotonic() - started)

    async def settle(self, db: Any) -> float:
        """Wait until every task event of the soak's users is sent and each actor it fed
        (webhook deliveries included) has finished; returns the seconds waited (``inf``
        when the drain timeout ran out first)."""
        t0 = time.monotonic()
        # The welcome emails' events too: the ledger counts them.
        types = [*_TASK_TYPES, "user.registered"]
        flt = {"user_id": {"$in": self.user_ids}, "type": {"$in": types}}
        fields = {"pending": 1, "dispatched_at": 1, "awaiting": 1, "finished": 1}
        while time.monotonic() - t0 < self.drain_timeout:
            docs = await db["events"].find(flt, fields).to_list()
            if all(event_settled(d) for d in docs):
                return round(time.monotonic() - t0, 1)
            await asyncio.sleep(0.5)
        return float("inf")

    async def check(
        self, db: Any, receiver: Receiver, smtp: SmtpSink, settled: float
    ) -> dict[str, Any]:
        """What every acknowledged write caused, against what it should have caused."""
        users = self.user_ids
        evs = (
            await db["events"]
            .find(
                {"user_id": {"$in": users}, "type": {"$in": _TASK_TYPES}},
                {"type": 1, "user_id": 1, "data.task.status": 1},
            )
            .to_list()
        )
        # Webhooks: each task event exactly once (the hooks were made before the first task).
        delivered = Counter(r.headers.get("X-Webhook-Id", "") for r in receiver.at("hook"))
        expected = {str(e["_id"]) for e in evs}
        hooks = {
            "expected": len(expected),
            "missing": len(expected - set(delivered)),
            "duplicates": sum(n - 1 for k, n in delivered.items() if k in expected and n > 1),
            "unexpected": sum(n for k, n in delivered.items() if k not in expected),
        }
        # Welcome emails: one per user.
        sent = Counter(str(m["To"]) for m in smtp.messages if not _is_reminder(m))
        mails = {
            "expected": len(self.emails),
            "missing": sum(1 for e in self.emails if not sent[e]),
            "duplicates": sum(sent[e] - 1 for e in self.emails if sent[e] > 1),
        }
        # Search entries: each task's at its version; a deleted task's a tombstone.
        tasks = {
            t["_id"]: t["version"]
            async for t in db["tasks"].find({"owner": {"$in": users}}, {"version": 1})
        }
        entries = {
            e["_id"]: e.get("version")
            async for e in db[search.COLLECTION].find({"owner": {"$in": users}}, {"version": 1})
        }
        deleted = {
            e["data"]["task"]["id"]
            for e in await db["events"]
            .find({"user_id": {"$in": users}, "type": "task.deleted"}, {"data.task.id": 1})
            .to_list()
        }
        index = {
            "tasks": len(tasks),
            "stale_or_missing": sum(1 for tid, v in tasks.items() if entries.get(tid) != v),
            "deleted": len(deleted),
            "deleted_not_tombstoned": sum(
                1 for tid, v in entries.items() if str(tid) in deleted and v != search.TOMBSTONE
            ),
        }
        # Analytics: the counters equal the events they count, each fold's guard once.
        want: Counter[str] = Counter()
        for e in evs:
            kind = {"task.created": "created", "task.completed": "completed"}.get(e["type"])
            kind = kind or ("deleted" if e["type"] == "task.deleted" else None)
            if kind is not None:
                want[kind] += 1
            if e["type"] == "task.created" and e.get("data", {}).get("task", {}).get("status") == (
                "done"
            ):
                want["completed"] += 1
        # The counters plus the folds the next rollup's compaction adds (core/analytics.py).
        got: Counter[str] = Counter(await counted_now(db, users))
        # The fold's guard is keyed by the event id as the message carries it (a string).
        counted = {str(e["_id"]) for e in evs if e["type"] in _COUNTED}
        seen = await db["analytics_seen"].count_documents({"_id": {"$in": list(counted)}})
        analytics = {
            "expected": dict(want),
            "counted": dict(got),
            "guards": seen,
            "events_counted": len(counted),
        }
        created = sum(1 for e in evs if e["type"] == "task.created")
        ok = (
            settled != float("inf")
            and created == self.acked_creates
            and hooks["missing"] == hooks["duplicates"] == hooks["unexpected"] == 0
            and mails["missing"] == mails["duplicates"] == 0
            and index["stale_or_missing"] == index["deleted_not_tombstoned"] == 0
            and all(want[f] == got[f] for f in ("created", "completed", "deleted"))
            and seen == len(counted)
        )
        return {
            "settled_seconds": settled,
            "creates": {"acknowledged": self.acked_creates, "events": created},
            "webhooks": hooks,
            "emails": mails,
            "search": index,
            "analytics": analytics,
            "pass": ok,
        }

    async def fire(self, env: dict[str, str], db: Any, job: str) -> str:
        """Fire ``job`` now (``taskmanager run-job``) and wait for its run to end; returns its
        status (``succeeded``, ``failed``, or ``timeout`` after 120 s)."""
        proc = await asyncio.create_subprocess_exec(
            taskmanager_exe(),
            "run-job",
            job,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            return f"run-job failed: {out.decode()[-300:]}"
        key = out.decode().strip().rsplit(" as ", 1)[-1]
        t0 = time.monotonic()
        while time.monotonic() - t0 < 120:
            run = await db["job_runs"].find_one({"_id": key}, {"status": 1})
            if run is not None and run["status"] in ("succeeded", "failed"):
                return str(run["status"])
            await asyncio.sleep(0.5)
        return "timeout"

    async def check_scheduled(
        self, db: Any, smtp: SmtpSink, fired_at: datetime, jobs: dict[str, str]
    ) -> dict[str, Any]:
        """The rollups and the reminders, once both jobs ran after the load (see the module
        docstring)."""
        users = self.user_ids
        # Rollups: the per-day figures equal the counters they roll up.
        counters: Counter[str] = Counter()
        async for c in db["analytics_counters"].find({"user_id": {"$in": users}}):
            for f in ("created", "completed", "deleted"):
                counters[f] += int(c.get(f, 0))
        rolled: Counter[str] = Counter()
        days = 0
        async for d in db["analytics_daily"].find({"user_id": {"$in": users}}):
            days += 1
            for f in ("created", "completed", "deleted"):
                rolled[f] += int(d.get(f, 0))
        rollups = {"user_days": days, "figures": dict(rolled), "counters": dict(counters)}
        # Reminders: every open task due in the window at the forced run is recorded...
        logged = {
            d["_id"]: d
            async for d in db["email_log"].find({"user_id": {"$in": users}, "kind": "due_soon"})
        }
        window = {"$gt": fired_at + timedelta(minutes=1), "$lt": fired_at + timedelta(hours=23)}
        due = (
            await db["tasks"]
            .find(
                {"owner": {"$in": users}, "status": {"$ne": "done"}, "due_at": window},
                {"due_at": 1},
            )
            .to_list()
        )
        unrecorded = [t for t in due if due_key(str(t["_id"]), t["due_at"]) not in logged]
        # ... each recorded one is in exactly one email to its owner and one notification ...
        bodies: dict[str, list[str]] = {}
        for m in smtp.messages:
            payload = m.get_payload(decode=True)
            if isinstance(payload, bytes) and _is_reminder(m):
                bodies.setdefault(str(m["To"]), []).append(payload.decode())
        address = dict(zip(users, self.emails, strict=True))
        emailed: Counter[int] = Counter()
        for key, log in logged.items():
            line = f"(due {key.split(':', 2)[2]})"  # due:<task id>:<due time>
            emailed[sum(b.count(line) for b in bodies.get(address[log["user_id"]], []))] += 1
        in_app = await db["notifications"].count_documents(
            {"user_id": {"$in": users}, "key": {"$in": list(logged)}}
        )
        # ... and no email reminds of anything unrecorded.
        lines = sum(b.count("(due ") for bs in bodies.values() for b in bs)
        reminders = {
            "due_in_window": len(due),
            "recorded": len(logged),
            "unrecorded": len(unrecorded),
            "emailed_once": emailed[1],
            "emailed_not_once": sum(n for times, n in emailed.items() if times != 1),
            "emails": sum(len(bs) for bs in bodies.values()),
            "unexpected_lines": lines - sum(times * n for times, n in emailed.items()),
            "in_app": in_app,
        }
        ok = (
            all(status == "succeeded" for status in jobs.values())
            and rolled == counters
            and days > 0
            and reminders["unrecorded"] == reminders["emailed_not_once"] == 0
            and reminders["unexpected_lines"] == 0
            and in_app == len(logged)
        )
        return {"jobs": jobs, "rollups": rollups, "reminders": reminders, "pass": ok}

    async def load(self, ports: list[int], hook_url: str) -> None:
        """Open-loop mixed load for ``seconds``, sampling RSS every ``interval``."""
        rng = random.Random(11)
        kinds = [k for w, k in MIX for _ in range(w)]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            users = []
            for u in range(4):
                body = {"email": f"soak{u}-{rng.random()}@example.com", "password": PASSWORD}
                url = f"http://127.0.0.1:{ports[u % 2]}{API}/auth/register"
                async with http.post(url, json={**body, "name": f"soak{u}"}) as resp:
                    data = await resp.json()
                    if resp.status != 201:
                        raise RuntimeError(f"register answered {resp.status}: {data}")
                auth = {"Authorization": f"Bearer {data['access_token']}"}
                hook = {"url": hook_url, "events": ["*"]}
                async with http.post(
                    url.replace("/auth/register", "/webhooks"), json=hook, headers=auth
                ) as resp:
                    if resp.status != 201:
                        raise RuntimeError(f"webhook answered {resp.status}: {await resp.text()}")
                    hook_id = str((await resp.json())["id"])
                users.append({"auth": auth, "hook": hook_id, "email": body["email"]})
                self.emails.append(body["email"])
                self.user_ids.append(str(data["user"]["id"]))
            url = f"http://127.0.0.1:{ports[0]}{API}/auth/login"
            async with http.post(url, json={"email": ADMIN_EMAIL, "password": PASSWORD}) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"admin login answered {resp.status}: {await resp.text()}")
                self.admin_auth = {"Authorization": f"Bearer {(await resp.json())['access_token']}"}
            self.spare_hook_url = hook_url.replace("/hook", "/spare")
            ids: list[list[str]] = [[] for _ in users]
            pending: set[asyncio.Task[None]] = set()
            gate = asyncio.Semaphore(64)
            t0 = time.monotonic()
            next_sample = 0.0
            i = 0
            now = datetime.now(UTC)
            while (elapsed := time.monotonic() - t0) < self.seconds:
                if elapsed >= next_sample:
                    self.sample(elapsed)
                    next_sample += self.interval
                due = t0 + i / self.rate
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                u = i % len(users)
                base = f"http://127.0.0.1:{ports[i % 2]}{API}"
                kind = rng.choice(kinds) if ids[u] else "create"
                task = asyncio.create_task(
                    self.one(http, gate, base, users[u], kind, ids[u], rng, now, i)
                )
                pending.add(task)
                task.add_done_callback(pending.discard)
                i += 1
            if pending:
                await asyncio.wait(pending, timeout=30)
            self.sample(time.monotonic() - t0)

    async def one(
        self,
        http: aiohttp.ClientSession,
        gate: asyncio.Semaphore,
        base: str,
        user: dict[str, Any],
        kind: str,
        ids: list[str],
        rng: random.Random,
        now: datetime,
        i: int,
    ) -> None:
        """One request of the mix."""
        method, path, body = "GET", "/tasks", None
        target = rng.choice(ids) if ids else ""
        if kind == "create":
            method, body = "POST", task_body(rng, now, i)
            if rng.random() < 0.25:  # due soon: the reminders job has something to do
                body["due_at"] = (now + timedelta(hours=rng.uniform(1, 20))).isoformat()
        elif kind == "update":
            method, path, body = (
                "PATCH",
                f"/tasks/{target}",
                {"status": rng.choice(["todo", "done"])},
            )
        elif kind == "delete" and len(ids) > 20:
            method, path = "DELETE", f"/tasks/{target}"
            ids.remove(target)
        elif kind == "list_todo":
            path = "/tasks?status=todo"
        elif kind in ("get", "delete"):
            path = f"/tasks/{target}"
        elif kind == "stats":
            path = "/tasks/stats"
        elif kind == "search":
            path = f"/search?q={rng.choice(WORDS)}"
        elif kind == "activity":
            path = f"/tasks/{target}/activity"
        elif kind in ("notifications", "me", "webhooks"):
            path = f"/{kind}"
        elif kind == "analytics":
            today = now.date().isoformat()
            path = f"/analytics/summary?from={today}&to={today}"
        elif kind == "deliveries":
            path = f"/webhooks/{user['hook']}/deliveries"
        elif kind == "login":
            method, path = "POST", "/auth/login"
            body = {"email": user["email"], "password": PASSWORD}
        elif kind == "bulk" and len(ids) >= 2:
            method, path = "POST", "/tasks/bulk"
            body = {"ids": rng.sample(ids, 2), "set": {"priority": rng.choice(["low", "high"])}}
        elif kind == "patch_me":
            method, path, body = "PATCH", "/me", {"name": f"soak {i}"}
        elif kind == "admin":
            path = ADMIN_READS[i % len(ADMIN_READS)]
        elif kind in ("read_notification", "session", "webhook_cycle"):
            await self.sequence(http, gate, base, user, kind)
            return
        auth = self.admin_auth if kind == "admin" else user["auth"]
        try:
            async with gate, http.request(method, base + path, json=body, headers=auth) as resp:
                data = await resp.read()
                status = resp.status
            if kind == "create" and status == 201:
                ids.append(str(json.loads(data)["id"]))
                self.acked_creates += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.statuses[f"failed: {type(exc).__name__}"] += 1
            return
        self.statuses[f"{status // 100}xx"] += 1
        self.by_kind[kind] += 1

    async def sequence(
        self,
        http: aiohttp.ClientSession,
        gate: asyncio.Semaphore,
        base: str,
        user: dict[str, Any],
        kind: str,
    ) -> None:
        """A kind made of dependent requests: read the newest notification; sign in, refresh and
        sign out (a login of its own: the user's main token is untouched); create a spare
        webhook (to another receiver path: the ledger's hook is untouched), read its
        deliveries and delete it."""
        auth = user["auth"]
        steps: list[tuple[str, str, Any]] = []
        try:
            async with gate:
                if kind == "read_notification":
                    status, data = await _call(http, "GET", base + "/notifications?limit=1", auth)
                    steps.append(("GET", "/notifications", status))
                    items = (data or {}).get("items") or []
                    if items:
                        path = f"/notifications/{items[0]['id']}/read"
                        status, _ = await _call(http, "POST", base + path, auth)
                        steps.append(("POST", path, status))
                elif kind == "session":
                    creds = {"email": user["email"], "password": PASSWORD}
                    status, pair = await _call(http, "POST", base + "/auth/login", None, creds)
                    steps.append(("POST", "/auth/login", status))
                    if status == 200:
                        refresh = {"refresh_token": pair["refresh_token"]}
                        status, pair = await _call(
                            http, "POST", base + "/auth/refresh", None, refresh
                        )
                        steps.append(("POST", "/auth/refresh", status))
                        if status == 200:
                            mine = {"Authorization": f"Bearer {pair['access_token']}"}
                            status, _ = await _call(http, "POST", base + "/auth/logout", mine)
                            steps.append(("POST", "/auth/logout", status))
                else:
                    hook = {"url": self.spare_hook_url, "events": ["task.created"]}
                    status, made = await _call(http, "POST", base + "/webhooks", auth, hook)
                    steps.append(("POST", "/webhooks", status))
                    if status == 201:
                        path = f"/webhooks/{made['id']}"
                        status, _ = await _call(http, "GET", base + path + "/deliveries", auth)
                        steps.append(("GET", path + "/deliveries", status))
                        status, _ = await _call(http, "DELETE", base + path, auth)
                        steps.append(("DELETE", path, status))
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.statuses[f"failed: {type(exc).__name__}"] += 1
            return
        for _, _, status in steps:
            self.statuses[f"{status // 100}xx"] += 1
        self.by_kind[kind] += 1

    def summary(self, dead: list[str], logs: dict[str, list[str]], took: float) -> dict[str, Any]:
        """Per process: after warm-up, end, peak, growth and verdicts."""
        procs = {}
        cut = self.seconds * self.warmup_share
        for name, series in sorted(self.samples.items()):
            after = next((mb for t, mb in series if t >= cut), series[-1][1])
            end = series[-1][1]
            peak = max(mb for _, mb in series)
            growth = end / after - 1 if after else 0.0
            procs[name] = {
                "after_warmup_mb": round(after, 1),
                "end_mb": round(end, 1),
                "peak_mb": round(peak, 1),
                "growth": round(growth, 4),
                "pass_growth": growth <= GROWTH_TARGET,
                "pass_rss": peak <= RSS_TARGET_MB,
                "series": series,
            }
        return {
            "seconds": self.seconds,
            "rate": self.rate,
            "interval": self.interval,
            "warmup_seconds": round(cut, 1),
            "took": round(took, 1),
            "statuses": dict(self.statuses),
            "by_kind": dict(self.by_kind),
            "errors_5xx": self.statuses.get("5xx", 0)
            + sum(v for k, v in self.statuses.items() if k.startswith("failed")),
            "dead": dead,
            "log_errors": logs,
            "procs": procs,
            "ledger": self.ledger,
        }


_TASK_TYPES = [str(t) for t in TASK_EVENT_TYPES]
#: The scheduled jobs fired after the load, whose effects the ledger accounts for.
SCHEDULED = ("analytics-rollup", "due-soon-reminders")
_COUNTED = ("task.created", "task.completed", "task.deleted")


def ledger_lines(led: dict[str, Any]) -> list[str]:
    """The ledger's part of the report."""
    if not led:
        return ["ledger    not checked"]
    h, m, x, a = led["webhooks"], led["emails"], led["search"], led["analytics"]
    return [
        f"ledger    {'PASS' if led['pass'] else 'MISS'} (every side effect exactly once); the "
        f"outbox settled {led['settled_seconds']} s after the load",
        f"  writes     {led['creates']['acknowledged']} creates acknowledged, "
        f"{led['creates']['events']} task.created events recorded",
        f"  webhooks   {h['expected']} task events: missing {h['missing']}, duplicates "
        f"{h['duplicates']}, unexpected {h['unexpected']}",
        f"  emails     {m['expected']} welcome: missing {m['missing']}, duplicates "
        f"{m['duplicates']}",
        f"  search     {x['tasks']} tasks: entry stale or missing {x['stale_or_missing']}; "
        f"{x['deleted']} deleted: not tombstoned {x['deleted_not_tombstoned']}",
        f"  analytics  counters {a['counted']} for events {a['expected']}; fold guards "
        f"{a['guards']} of {a['events_counted']}",
        *_scheduled_lines(led.get("scheduled")),
    ]


async def _call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    auth: dict[str, str] | None,
    body: Any = None,
) -> tuple[int, Any]:
    """One request; its status and JSON body (``None`` when it has none)."""
    async with http.request(method, url, json=body, headers=auth or {}) as resp:
        raw = await resp.read()
        return resp.status, json.loads(raw) if raw and resp.content_type.endswith("json") else None


def _is_reminder(message: Any) -> bool:
    """A due-soon email ("Due soon: <title>" or "<n> tasks due soon"), not a welcome."""
    return "due soon" in str(message["Subject"]).lower()


def _scheduled_lines(sch: dict[str, Any] | None) -> list[str]:
    if not sch:
        return ["  scheduled  not checked"]
    r, m = sch["rollups"], sch["reminders"]
    jobs = ", ".join(f"{job} {status}" for job, status in sch["jobs"].items())
    return [
        f"  scheduled  fired after the load: {jobs}",
        f"  rollups    {r['user_days']} user-days, figures {r['figures']} for counters "
        f"{r['counters']}",
        f"  reminders  {m['recorded']} recorded ({m['due_in_window']} open tasks due in the "
        f"window, unrecorded {m['unrecorded']}); in {m['emails']} emails: exactly once "
        f"{m['emailed_once']}, not once {m['emailed_not_once']}, unexpected "
        f"{m['unexpected_lines']}; in-app {m['in_app']}",
    ]


def report(res: dict[str, Any]) -> str:
    """The text report."""
    lines = [
        "Memory over a soak (python -m bench soak): 2 web, 1 worker (1 process, 8 threads), "
        "1 scheduler",
        f"  load      {res['rate']:g} requests/s open loop for {res['seconds']:g} s, mixed: "
        + ", ".join(f"{k} {v}" for k, v in sorted(res["by_kind"].items())),
        f"  answers   {', '.join(f'{k} {v}' for k, v in sorted(res['statuses'].items()))}; "
        f"5xx or failed: {res['errors_5xx']}; processes that died: {', '.join(res['dead']) or 0}",
        f"  RSS       sampled every {res['interval']:g} s; growth = end vs after the "
        f"{res['warmup_seconds']:g} s warm-up",
        *ledger_lines(res.get("ledger") or {}),
        "",
        f"{'process':<22}{'warm MB':>9}{'end MB':>9}{'peak MB':>9}{'growth':>9}  "
        f"{'<= 10 %':<8}{'<= 200 MB':<9}",
    ]
    for name, p in res["procs"].items():
        lines.append(
            f"{name:<22}{p['after_warmup_mb']:>9.1f}{p['end_mb']:>9.1f}{p['peak_mb']:>9.1f}"
            f"{p['growth']:>9.1%}  {'PASS' if p['pass_growth'] else 'MISS':<8}"
            f"{'PASS' if p['pass_rss'] else 'MISS':<9}"
        )
    errs = {k: v for k, v in res["log_errors"].items() if v}
    lines.append(f"error lines in the logs: {sum(len(v) for v in errs.values())}")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """``python -m bench soak [--seconds 600] [--rate 10]``."""
    ap = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=600.0, help="soak length (the issue: 10 min)")
    ap.add_argument("--rate", type=float, default=10.0, help="requests/s offered, all kinds")
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between RSS samples")
    ap.add_argument("--warmup-share", type=float, default=0.2, help="share of the soak as warm-up")
    ap.add_argument(
        "--drain-timeout", type=float, default=180.0, help="seconds the outbox may take to settle"
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "soak-latest.txt")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    ns = ap.parse_args(argv)
    if ns.seconds <= 0 or ns.rate <= 0 or ns.interval <= 0:
        ap.error("--seconds, --rate and --interval > 0")
    soak = Soak(ns.seconds, ns.rate, ns.interval, ns.warmup_share, ns.drain_timeout)
    res = asyncio.run(soak.run())
    text = report(res)
    publish(text, None if str(ns.out) == "-" else ns.out)
    if ns.json is not None:
        ns.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
