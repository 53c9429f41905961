"""The worker pipeline's writes by ``_id`` never carry ``$or`` (nor ``$nor``, ``$expr``), and
nothing sends findAndModify.

SecantusDB answers a filter on ``_id`` alone (or with plain field comparisons) through the
``_id`` index, but scans the whole collection as soon as the filter also holds ``$or``: 50 ms
against 1 ms at 5,000 documents, so the pipeline slowed as data grew (108 → 20 messages/s over
2,400 tasks). It runs every findAndModify as such a scan too (its write re-asserts the query
under ``$and``): 24 ms against 1.8 ms for the same update and a read of the document at 3,000
documents (``python -m bench store``), so those go through :func:`core.store.update_then_read`.
``explain()`` cannot tell the cases apart (it reports COLLSCAN for both), so these tests record
the commands the pipeline really sends, with PyMongo's command monitoring, and check every
filter that names ``_id``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from bson import ObjectId
from pymongo import AsyncMongoClient, monitoring

from config.connections import Connections
from config.settings import Settings
from core import events, fairness, jobruns, notifications, search, webhooks
from core.context import Context
from core.store import Store, update_then_read, utcnow
from workers.relay import Outcome, Relay

#: Operators that make a filter naming ``_id`` scan the collection on SecantusDB.
SCANNING = ("$or", "$nor", "$expr")


class Recorder(monitoring.CommandListener):
    """Every filter sent, as ``(collection, command, filter)``."""

    def __init__(self) -> None:
        self.filters: list[tuple[str, str, dict[str, Any]]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        cmd, name = event.command, event.command_name
        coll = str(cmd.get(name, ""))
        if name == "find":
            self.filters.append((coll, name, dict(cmd.get("filter", {}))))
        elif name == "findAndModify":
            self.filters.append((coll, name, dict(cmd.get("query", {}))))
        elif name in ("update", "delete"):
            for op in cmd.get(f"{name}s", []):
                self.filters.append((coll, name, dict(op.get("q", {}))))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def by_id(self, collection: str) -> list[tuple[str, dict[str, Any]]]:
        """The filters sent to ``collection`` that name ``_id`` (at any depth of ``$and``)."""
        return [(n, f) for c, n, f in self.filters if c == collection and _names_id(f)]


def _names_id(flt: dict[str, Any]) -> bool:
    return "_id" in flt or any(_names_id(part) for part in flt.get("$and", []))


def _scanning(flt: dict[str, Any]) -> list[str]:
    found = [op for op in SCANNING if op in flt]
    for part in flt.get("$and", []):
        found += _scanning(part)
    return found


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def monitored(settings: Settings, recorder: Recorder) -> AsyncIterator[Context]:
    """A context whose MongoDB client reports every command to ``recorder``."""
    client: AsyncMongoClient[Any] = AsyncMongoClient(
        settings.mongodb_url, tz_aware=True, event_listeners=[recorder]
    )
    redis = Connections(settings).redis()
    ctx = Context(settings, Store(client, settings.mongodb_db), redis)
    await ctx.store.ensure_indexes()
    recorder.filters.clear()
    try:
        yield ctx
    finally:
        await client.close()
        await redis.aclose()


def _assert_no_scan(recorder: Recorder, collection: str) -> int:
    sent = recorder.by_id(collection)
    bad = [(name, flt) for name, flt in sent if _scanning(flt)]
    assert not bad, bad
    return len(sent)


async def test_indexing_writes_by_id_without_or(monitored: Context, recorder: Recorder) -> None:
    tasks = monitored.store["tasks"]
    now = utcnow()
    docs = [
        {
            "owner": "alice",
            "version": 1,
            "title": f"buy milk {i}",
            "tags": [],
            "description": "",
            "updated_at": now,
        }
        for i in range(3)
    ]
    ids = (await tasks.insert_many(docs)).inserted_ids
    first = str(ids[0])
    assert await search.index_task(monitored, first, "alice") == "indexed"
    # The same version again (a duplicate message), then a newer one, then an older analyzer.
    assert await search.index_task(monitored, first, "alice") == "current"
    await tasks.update_one({"_id": ids[0]}, {"$set": {"version": 2, "title": "buy bread"}})
    assert await search.index_task(monitored, first, "alice") == "indexed"
    await monitored.store[search.COLLECTION].update_one({"_id": ids[0]}, {"$set": {"analyzer": 0}})
    assert await search.index_task(monitored, first, "alice") == "indexed"
    assert (await search.reindex(monitored, "alice")).written == 3
    await search.tombstone(monitored, [(ids[1], "alice")])
    # Every path above (first write, duplicate, newer, analyzer, rebuild, tombstone) was seen.
    assert _assert_no_scan(recorder, search.COLLECTION) >= 8
    stored = await monitored.store[search.COLLECTION].find_one({"_id": ids[0]})
    assert stored is not None
    assert (stored["version"], stored["analyzer"]) == (2, search.ANALYZER)
    assert "bread" in stored["terms"]


@pytest.mark.parametrize("fair", [True, False])
async def test_the_relay_claims_and_settles_by_id_without_or(
    platform: Any, monitored: Context, recorder: Recorder, fair: bool
) -> None:
    evs = [
        events.new_event(
            events.EventType.TASK_CREATED, user_id=f"u{i % 3}", subject_id=f"t{i}", data={}
        )
        for i in range(12)
    ]
    await events.record(monitored, evs, None)
    relays = [Relay(monitored, platform.broker, batch_size=5, fair=fair) for _ in range(2)]
    sent: list[str] = []

    def record(claimed: list[Any], outcome: Outcome) -> None:
        sent.extend(str(e["_id"]) for e in claimed)
        outcome.sent.extend(e["_id"] for e in claimed)

    for relay in relays:
        relay._enqueue = record  # type: ignore[method-assign]
    for _ in range(20):
        if not await monitored.store["events"].count_documents({"pending": True}):
            break
        await asyncio.gather(*(r.drain_once() for r in relays))
    # Two relays sharing the work sent each event once.
    assert sorted(sent) == sorted(str(e["_id"]) for e in evs)
    assert _assert_no_scan(recorder, "events") >= 2


async def test_a_claim_of_events_read_whole_reads_nothing_again(
    monitored: Context, recorder: Recorder
) -> None:
    """The relay's view reads its newest events whole, so claiming them is the compare-and-set
    update alone; when another relay took one first, the claim reads back what it got."""
    evs = [
        events.new_event(events.EventType.TASK_CREATED, user_id="u", subject_id=f"t{i}", data={})
        for i in range(4)
    ]
    await events.record(monitored, evs, None)
    coll = monitored.store["events"]
    whole = await coll.find({"pending": True}).sort("_id", 1).to_list()
    now = utcnow()
    recorder.filters.clear()
    mine = await fairness.claim(monitored, whole[:2], now, timedelta(seconds=30), "me")
    assert [d["_id"] for d in mine] == [e["_id"] for e in evs[:2]]
    assert all(d["lease_owner"] == "me" and d["data"] == {} for d in mine)
    assert [n for c, n, _ in recorder.filters if c == "events"] == ["update"], recorder.filters
    # Another relay claims one of the next two between our read and our claim.
    await coll.update_one({"_id": evs[2]["_id"]}, {"$set": {"lease_owner": "other"}})
    recorder.filters.clear()
    mine = await fairness.claim(monitored, whole[2:], now, timedelta(seconds=30), "me")
    assert [d["_id"] for d in mine] == [evs[3]["_id"]]
    assert [n for c, n, _ in recorder.filters if c == "events"] == ["update", "find"]
    # Read through the view's projection (no data): read back whole after the claim.
    await coll.update_many({}, {"$unset": {"lease_owner": "", "lease_until": ""}})
    partial = await coll.find({"_id": evs[2]["_id"]}, fairness.FIELDS).to_list()
    recorder.filters.clear()
    mine = await fairness.claim(monitored, partial, now, timedelta(seconds=30), "me")
    assert [d["_id"] for d in mine] == [evs[2]["_id"]] and "data" in mine[0]
    assert [n for c, n, _ in recorder.filters if c == "events"] == ["update", "find"]


async def test_update_then_read(monitored: Context) -> None:
    coll = monitored.store["shapes"]
    await coll.insert_one({"_id": 1, "n": 0, "token": None})
    after = await update_then_read(coll, {"_id": 1, "token": None}, {"$set": {"token": "a"}})
    assert after == {"_id": 1, "n": 0, "token": "a"}
    # No match: nothing written, nothing read.
    assert await update_then_read(coll, {"_id": 1, "token": None}, {"$inc": {"n": 1}}) is None
    assert await update_then_read(coll, {"_id": 2}, {"$inc": {"n": 1}}) is None
    # The document changed again before the read: ``still`` says it is no longer ours.
    assert (
        await update_then_read(coll, {"_id": 1}, {"$inc": {"n": 1}}, still={"token": "b"}) is None
    )
    assert await update_then_read(
        coll, {"_id": 2}, {"$setOnInsert": {"n": 5}}, upsert=True, projection={"n": 1}
    ) == {"_id": 2, "n": 5}
    assert await coll.find_one({"_id": 1}) == {"_id": 1, "n": 1, "token": "a"}
    with pytest.raises(ValueError, match="_id"):
        await update_then_read(coll, {"n": 1}, {"$inc": {"n": 1}})


async def test_deliveries_leases_and_redeliveries_send_no_find_and_modify(
    monitored: Context, recorder: Recorder
) -> None:
    hook = {"_id": ObjectId(), "owner": "alice", "url": "http://127.0.0.1:9/h", "events": ["*"]}
    await monitored.store["webhooks"].insert_one(hook)
    event = {"id": str(ObjectId()), "type": "task.created", "created_at": "2026-12-02T00:00:00Z"}
    delivery, fresh = await webhooks.ensure_delivery(monitored, hook, event)
    assert fresh and delivery["status"] == "pending"
    assert await webhooks.ensure_delivery(monitored, hook, event) == (delivery, True)
    lease = await webhooks.claim(monitored, delivery["_id"], 0, timedelta(seconds=30))
    assert isinstance(lease, webhooks.Lease) and lease.delivery["lease_token"] == lease.token
    assert await webhooks.claim(monitored, delivery["_id"], 0, timedelta(seconds=30)) == "busy"
    # The lease runs out: the next claim takes it over and counts the interrupted attempt.
    await monitored.store["webhook_deliveries"].update_one(
        {"_id": delivery["_id"]}, {"$set": {"lease_until": utcnow() - timedelta(seconds=1)}}
    )
    taken = await webhooks.claim(monitored, delivery["_id"], 0, timedelta(seconds=30))
    assert isinstance(taken, webhooks.Lease) and taken.took_over == "expired"
    assert taken.delivery["attempts"] == 1 and taken.delivery["lease_token"] == taken.token
    failed = webhooks.Attempt(ok=False, response_code=500, error="HTTP 500")
    assert await webhooks.record_attempt(monitored, delivery["_id"], taken.token, failed, "failed")
    assert not await webhooks.note_outcome(monitored, hook, failed)
    again = await webhooks._redeliver(monitored, "alice", str(hook["_id"]), delivery["_id"])
    assert again is not None and again["generation"] == 1 and again["status"] == "pending"
    assert await webhooks.claim(monitored, delivery["_id"], 0, timedelta(seconds=30)) is None
    run = await jobruns.start(monitored, "backup", "backup:1")
    assert run is not None and run["attempts"] == 1 and run["status"] == "running"
    note = {"_id": ObjectId(), "user_id": "alice", "key": "k", "read_at": None}
    await monitored.store["notifications"].insert_one(note)
    assert (await notifications.mark_read(monitored, "alice", str(note["_id"])))["read_at"]
    sent = [name for _, name, _ in recorder.filters]
    assert "findAndModify" not in sent and sent.count("update") >= 8, sent
