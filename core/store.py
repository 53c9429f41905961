"""The MongoDB store: database handle, index declarations, transactions.

Every collection's indexes are declared here, in code, and created at start-up by
:meth:`Store.ensure_indexes` (idempotent). Indexes use only what both MongoDB and the
SecantusDB test server support (no text indexes).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

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
        IndexModel([("user_id", ASCENDING), ("_id", DESCENDING)], name="user_events"),
    ],
    "email_log": [IndexModel([("user_id", ASCENDING)], name="user")],
}


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
        """Create every declared index (no-op when they exist)."""
        for collection, indexes in INDEXES.items():
            await self.db[collection].create_indexes(indexes)

    async def ping(self) -> None:
        """Raise if the server cannot be reached."""
        await self.db.command("ping")

    async def transaction(self, work: Callable[[AsyncClientSession], Awaitable[T]]) -> T:
        """Run ``work`` in a multi-document transaction, retried on transient errors.

        Used wherever a write and its events must land together (the outbox).
        """
        async with self.client.start_session() as session:
            return await session.with_transaction(work)
