"""The MongoDB store: database handle, index declarations, transactions.

Every collection's indexes are declared here, in code, and created at start-up by
:meth:`Store.ensure_indexes` (idempotent). Indexes use only what both MongoDB and the
SecantusDB test server support (no text indexes).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import pymongo
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, IndexModel
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

Doc = dict[str, Any]
T = TypeVar("T")

INDEXES: dict[str, list[IndexModel]] = {
    "users": [IndexModel([("email", ASCENDING)], unique=True, name="email_unique")],
    "logins": [
        IndexModel([("user_id", ASCENDING)], name="user"),
        IndexModel([("expires_at", ASCENDING)], expireAfterSeconds=0, name="ttl"),
    ],
    "events": [
        # The outbox: the relay reads undispatched events in order.
        IndexModel([("pending", ASCENDING), ("_id", ASCENDING)], name="outbox", sparse=True),
        # Fair dispatch (core/fairness.py): the events in flight (sent, side effects not all
        # finished), marked with their user.
        IndexModel([("inflight", ASCENDING)], name="inflight", sparse=True),
        # Events the relay set aside after repeated failures (core/events.py lists and counts).
        IndexModel([("set_aside_at", ASCENDING)], name="set_aside", sparse=True),
        # Receipts: events with messages still awaited, by when the relay's sweep looks again.
        IndexModel([("recheck_at", ASCENDING)], name="receipts", sparse=True),
        # A task's activity, newest first (its prefix serves a user's events).
        IndexModel(
            [("user_id", ASCENDING), ("subject_id", ASCENDING), ("_id", DESCENDING)],
            name="subject_events",
        ),
    ],
    # One index per task list sort, each starting with the owner and ending with _id (the
    # tiebreak of keyset pagination); MongoDB walks them either way for either direction.
    "tasks": [
        IndexModel(
            [("owner", ASCENDING), ("created_at", DESCENDING), ("_id", DESCENDING)],
            name="owner_created",
        ),
        IndexModel(
            [("owner", ASCENDING), ("due_key", ASCENDING), ("_id", ASCENDING)], name="owner_due"
        ),
        IndexModel(
            [("owner", ASCENDING), ("priority_rank", DESCENDING), ("_id", DESCENDING)],
            name="owner_priority",
        ),
        IndexModel(
            [("owner", ASCENDING), ("updated_at", DESCENDING), ("_id", DESCENDING)],
            name="owner_updated",
        ),
        # Due-soon reminders (core/notifications.py): every owner's open tasks due in the next
        # week, one range scan; status in the key filters out done tasks without fetching them.
        IndexModel([("due_key", ASCENDING), ("status", ASCENDING)], name="due_soon"),
        # Analytics rollup (core/analytics.py): the tasks completed on a day, across owners.
        # Partial: only done tasks carry a completed_at, so open ones take no space.
        IndexModel(
            [("completed_at", ASCENDING)],
            name="completed",
            partialFilterExpression={"status": "done"},
        ),
    ],
    "job_runs": [
        IndexModel([("job", ASCENDING), ("enqueued_at", DESCENDING)], name="job_latest"),
        IndexModel([("enqueued_at", ASCENDING)], expireAfterSeconds=30 * 86400, name="ttl"),
    ],
    "email_log": [IndexModel([("user_id", ASCENDING)], name="user")],
    # The in-app feed (core/notifications.py): one notification per (user, dedupe key); a
    # user's feed newest first, and their unread ones.
    "notifications": [
        IndexModel([("user_id", ASCENDING), ("key", ASCENDING)], unique=True, name="user_key"),
        IndexModel([("user_id", ASCENDING), ("_id", DESCENDING)], name="user_feed"),
        IndexModel(
            [("user_id", ASCENDING), ("read_at", ASCENDING), ("_id", DESCENDING)],
            name="user_read",
        ),
    ],
    # Stored responses of Idempotency-Key requests (core/idempotency.py), reaped after 24 h.
    "idempotency": [IndexModel([("expires_at", ASCENDING)], expireAfterSeconds=0, name="ttl")],
    # Webhooks (core/webhooks.py): a user's list, newest first (also serves the fan-out); the
    # delivery log per webhook, newest event first, reaped after its retention.
    "webhooks": [IndexModel([("owner", ASCENDING), ("_id", DESCENDING)], name="owner")],
    "webhook_deliveries": [
        IndexModel([("webhook_id", ASCENDING), ("event_oid", DESCENDING)], name="webhook_log"),
        IndexModel([("expires_at", ASCENDING)], expireAfterSeconds=0, name="ttl"),
    ],
    # Full-text search (core/search.py): one entry per task. owner_terms answers queries;
    # owner_id pages a user's entries (and is the shard-key index when sharded on owner);
    # tombstones of deleted tasks are reaped after a day.
    "search_index": [
        IndexModel(
            [("owner", ASCENDING), ("terms", ASCENDING), ("updated_at", DESCENDING)],
            name="owner_terms",
        ),
        IndexModel([("owner", ASCENDING), ("_id", ASCENDING)], name="owner_id"),
        IndexModel(
            [("deleted_at", ASCENDING)], expireAfterSeconds=86_400, sparse=True, name="tombstones"
        ),
    ],
    # Analytics (core/analytics.py): folds by event id (the at-least-once guard), the open
    # ones read by the compaction, reaped a week after they were added to the counters (``at``
    # is set then); per-day counters read by the rollup, day by day; the rolled-up figures,
    # read by _id range ("<user>:<day>") and rewritten day by day.
    "analytics_seen": [
        IndexModel([("at", ASCENDING)], expireAfterSeconds=7 * 86_400, name="ttl"),
        IndexModel([("open", ASCENDING)], name="open", sparse=True),
    ],
    "analytics_counters": [IndexModel([("day", ASCENDING), ("user_id", ASCENDING)], name="day")],
    "analytics_daily": [IndexModel([("day", ASCENDING), ("user_id", ASCENDING)], name="day")],
}


#: Indexes an earlier version declared and nothing reads any more, dropped at start-up: every
#: index costs each write of its collection (the events are updated about five times each, and
#: SecantusDB rewrites every index entry of a document it updates: 12 % of an event update).
RETIRED: dict[str, list[str]] = {"events": ["user_events"]}


def utcnow() -> datetime:
    """Now, in UTC, at millisecond precision (what BSON stores)."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


class Store:
    """A database handle plus the operations every domain module shares."""

    def __init__(self, client: AsyncMongoClient[Doc], db_name: str):
        self.client = client
        self.db: AsyncDatabase[Doc] = client[db_name]

    def __getitem__(self, name: str) -> AsyncCollection[Doc]:
        return self.db[name]

    async def ensure_indexes(self) -> None:
        """Create every declared index (no-op when they exist) and drop the retired ones."""
        for collection, indexes in INDEXES.items():
            await self.db[collection].create_indexes(indexes)
        for collection, names in RETIRED.items():
            present = await self.db[collection].index_information()
            for name in present.keys() & set(names):
                await self.db[collection].drop_index(name)

    async def ping(self) -> None:
        """Raise if the server cannot be reached."""
        await self.db.command("ping")

    async def transaction(self, work: Callable[[AsyncClientSession], Awaitable[T]]) -> T:
        """Run ``work`` in a multi-document transaction, retried on transient errors.

        Used wherever a write and its events must land together (the outbox). Retries stop
        after twice the server-selection timeout (``MONGODB_TIMEOUT_MS``): PyMongo's own limit
        is 120 s, and with the server unreachable every error is transient, so a write would
        hang for two minutes before failing.
        """
        limit = 2 * self.client.options.server_selection_timeout
        async with self.client.start_session() as session:
            with pymongo.timeout(limit):
                return await session.with_transaction(work)


async def update_then_read(
    coll: AsyncCollection[Doc],
    flt: Doc,
    update: Doc,
    *,
    still: Doc | None = None,
    upsert: bool = False,
    projection: Doc | None = None,
    session: AsyncClientSession | None = None,
) -> Doc | None:
    """What ``find_one_and_update(flt, update, return_document=AFTER)`` returns, as two
    point operations on ``flt["_id"]``: the update, then a read of that document; ``None``
    when the update matched nothing (and did not upsert), or when the document no longer
    matches ``still`` (fields the update set: a lease's token) by the time it is read.

    Why not findAndModify: SecantusDB, the test server, runs every findAndModify as a scan of
    the whole collection (its write re-asserts the query under ``$and``, which its planner
    never sends to an index: 9.7 ms at 1,000 documents, 75 ms at 10,000, against 2.2 ms for
    this function's two operations: ``python -m bench store``), while an update or a read
    pinned to ``_id`` is a point lookup. On MongoDB the two operations cost one more round
    trip than one findAndModify. The read sees the document as it is after the update,
    including another writer's change landing between the two (callers that hold a lease pin
    its token in ``still``); inside a transaction (``session``) both run on its snapshot.
    """
    if "_id" not in flt:
        raise ValueError("update_then_read needs a filter that names the _id")
    result = await coll.update_one(flt, update, upsert=upsert, session=session)
    if not result.matched_count and result.upserted_id is None:
        return None
    return await coll.find_one({"_id": flt["_id"], **(still or {})}, projection, session=session)
