"""A Redis without persistence restarted during writes: no side effect is lost or doubled.

Real processes: a private ``redis-server`` (``--save "" --appendonly no``) on a free port, the
suite's MongoDB, ``taskmanager web`` and ``taskmanager worker``, a webhook receiver on
loopback. Tasks are written continuously; meanwhile the worker is paused (SIGSTOP) so that
dispatched messages pile up in Redis, Redis is SIGKILLed and started again, empty, on the same
port, and the worker resumed. The relay had already marked those events dispatched, so only
the receipts (``core/events.py``) can bring their messages back: afterwards every written
task has its search entry, its webhook (received once per event, deduplicated by
``X-Webhook-Id``) and its analytics count exactly once, and the relay reports resends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from bson import ObjectId
from pymongo import AsyncMongoClient

from cli.embedded import PrivateRedis
from core import analytics
from tests.conftest import SmtpSink, eventually
from tests.e2e.helpers import Proc
from tests.e2e.test_pipeline import API, Api, Receiver, receiver, service_env, services

#: The bound the processes run with (``OUTBOX_REDELIVER_AFTER_S``).
BOUND_S = 3.0
#: How long every write's effects may take once Redis is back.
RECOVERY_S = 40.0


class RestartableRedis:
    """The test's private Redis: killed (SIGKILL) and started again empty on the same port."""

    def __init__(self) -> None:
        self.server = PrivateRedis().start()

    @property
    def url(self) -> str:
        return self.server.url

    def kill_and_restart(self) -> None:
        proc = self.server.proc
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        self.server.stop()  # removes its (empty) directory
        self.server = PrivateRedis(port=self.server.port).start()

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def private_redis() -> Iterator[RestartableRedis]:
    redis = RestartableRedis()
    yield redis
    redis.stop()


@contextlib.contextmanager
def paused(proc: Proc) -> Iterator[None]:
    """SIGSTOP the worker's processes (the supervisor's children), SIGCONT them after."""
    pids = proc.descendants()
    assert pids, proc.describe()
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


class Writer:
    """Creates tasks one after another until stopped; keeps the acknowledged ones."""

    def __init__(self, client: Api, token: str) -> None:
        self.client = client
        self.token = token
        self.task_ids: list[str] = []
        self.failures: list[str] = []
        self._stop = asyncio.Event()

    async def run(self, interval: float = 0.1) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                answer = await self.client.call(
                    "POST", f"{API}/tasks", token=self.token, body={"title": f"write {n}"}
                )
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.failures.append(repr(exc))
            else:
                if answer.status == 201:
                    self.task_ids.append(answer.json()["id"])
                else:
                    self.failures.append(f"{answer.status} {answer.text[:200]}")
            await asyncio.sleep(interval)

    def stop(self) -> None:
        self._stop.set()


@contextlib.asynccontextmanager
async def database(settings: Any) -> AsyncIterator[Any]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongodb_url, tz_aware=True)
    try:
        yield client[settings.mongodb_db]
    finally:
        await client.close()


async def resent_total(base: str) -> float:
    """``taskmanager_outbox_resent_total`` summed over actors, from the web's ``/metrics``."""
    async with aiohttp.ClientSession() as http, http.get(f"{base}/metrics") as resp:
        text = await resp.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("taskmanager_outbox_resent_total")
    )


@pytest.mark.timeout(120)
async def test_redis_restarted_empty_during_writes_loses_no_side_effect(
    private_redis: RestartableRedis, make_settings: Any, smtp: SmtpSink, tmp_path: Path
) -> None:
    settings = make_settings()
    env = service_env(settings, private_redis.url, smtp)
    env["OUTBOX_REDELIVER_AFTER_S"] = str(BOUND_S)
    async with (
        receiver() as rcv,
        services(env, tmp_path) as svc,
        database(settings) as db,
    ):
        client = Api(svc.base)
        try:
            await run_scenario(client, rcv, svc, private_redis, db)
        finally:
            await client.close()


async def run_scenario(
    client: Api, rcv: Receiver, svc: Any, redis: RestartableRedis, db: Any
) -> None:
    user = await client.register("loss@example.com")
    token = user["access_token"]
    hook_answer = await client.call(
        "POST",
        f"{API}/webhooks",
        token=token,
        body={"url": rcv.url("hook"), "events": ["task.created"]},
    )
    assert hook_answer.status == 201, hook_answer
    # The worker is up once a first task's webhook arrives.
    writer = Writer(client, token)
    first = await client.create_task(token, "warm-up")
    writer.task_ids.append(first["id"])
    await eventually(
        lambda: rcv.at("hook"), "the warm-up webhook", describe=svc.describe, timeout=60
    )

    writing = asyncio.create_task(writer.run())
    try:
        await asyncio.sleep(1.5)
        with paused(svc.worker):
            await asyncio.sleep(1.5)  # writes go on; their messages wait in Redis

            async def dispatched() -> bool:
                return await db["events"].count_documents({"pending": True}) == 0

            await eventually(
                dispatched, "the relay to dispatch the writes", describe=svc.describe, timeout=15
            )
            in_redis = len(writer.task_ids)
            await asyncio.to_thread(redis.kill_and_restart)
        await asyncio.sleep(2.0)  # writes go on against the new, empty Redis
    finally:
        writer.stop()
        await writing
    assert len(writer.task_ids) > in_redis > 5, (writer.task_ids, writer.failures)
    assert not writer.failures, writer.failures
    tasks = writer.task_ids
    task_oids = [ObjectId(t) for t in tasks]
    created = {
        e["subject_id"]: str(e["_id"])
        async for e in db["events"].find({"type": "task.created", "subject_id": {"$in": tasks}})
    }
    assert set(created) == set(tasks)

    async def complete() -> bool:
        indexed = await db["search_index"].count_documents({"_id": {"$in": task_oids}})
        counted = await analytics_created(db, user["user"]["id"])
        hooked = {r.headers["X-Webhook-Id"] for r in rcv.at("hook")}
        return indexed == len(tasks) and counted == len(tasks) and hooked >= set(created.values())

    await eventually(
        complete, "every write's side effects", describe=svc.describe, timeout=RECOVERY_S
    )
    # Past another round of resends (two bounds and a sweep), nothing arrives twice.
    await asyncio.sleep(2 * BOUND_S + 1)
    assert await db["search_index"].count_documents({"_id": {"$in": task_oids}}) == len(tasks)
    assert await db["search_index"].count_documents({}) == len(tasks)
    assert await analytics_created(db, user["user"]["id"]) == len(tasks)
    assert await db["analytics_seen"].count_documents({}) == len(tasks)
    by_event: dict[str, set[str]] = defaultdict(set)
    for req in rcv.at("hook"):
        by_event[req.headers["X-Webhook-Id"]].add(req.json()["data"]["task"]["id"])
    assert set(by_event) == set(created.values()), "one delivery per event, none unknown"
    assert all(by_event[created[t]] == {t} for t in tasks)
    deliveries = await db["webhook_deliveries"].find({}, {"status": 1, "event_id": 1}).to_list()
    assert sorted(d["event_id"] for d in deliveries) == sorted(created.values())
    assert {d["status"] for d in deliveries} == {"succeeded"}, deliveries
    # The loss happened and the receipts repaired it.
    assert await resent_total(svc.base) > 0, svc.describe()
    print(
        f"\n{len(tasks)} writes ({in_redis} before the restart), "
        f"{len(rcv.at('hook'))} webhook requests, {await resent_total(svc.base):.0f} resends"
    )


async def analytics_created(db: Any, user_id: str) -> int:
    return (await analytics.counted_now(db, [user_id]))["created"]
