"""Start-up brings every collection's indexes to what ``core/store.py`` declares."""

from __future__ import annotations

from pymongo import ASCENDING, DESCENDING

from core.context import Context
from core.store import INDEXES, RETIRED


async def test_ensure_indexes_creates_the_declared_and_drops_the_retired(ctx: Context) -> None:
    events = ctx.store["events"]
    # As an earlier version left it: the retired index beside data.
    await events.create_index([("user_id", ASCENDING), ("_id", DESCENDING)], name="user_events")
    await events.insert_one({"type": "task.created", "user_id": "u"})
    await ctx.store.ensure_indexes()
    await ctx.store.ensure_indexes()  # again: nothing left to create or drop
    for collection, models in INDEXES.items():
        names = set(await ctx.store[collection].index_information())
        assert {m.document["name"] for m in models} <= names, collection
        assert not names & set(RETIRED.get(collection, [])), collection
    assert await events.count_documents({}) == 1
