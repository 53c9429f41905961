"""The shared list machinery: the signed cursor codec and the keyset-page helper."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from bson import ObjectId
from pymongo import ASCENDING, DESCENDING

from config.settings import Settings
from core.errors import Invalid
from core.pagination import (
    CURSOR_PATTERN,
    MAX_CURSOR,
    CursorCodec,
    PageQuery,
    after,
    keyset_page,
)
from tests.conftest import TEST_SECRET

CODEC = CursorCodec.of(Settings(app_env="test", jwt_secret=TEST_SECRET))


def test_a_cursor_gives_back_its_position_and_matches_the_documented_pattern() -> None:
    when = datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    position = [when, ObjectId(), 12.5, "a", None]
    cursor = CODEC.encode("tasks:-due_at", position)
    assert re.fullmatch(CURSOR_PATTERN, cursor) and len(cursor) <= MAX_CURSOR
    assert CODEC.decode("tasks:-due_at", cursor, len(position)) == position


@pytest.mark.parametrize(
    "cursor",
    ["", "@@", "forged", "A" * 40, CODEC.encode("tasks:-due_at", [1, 2])[:-2] + "AA"],
)
def test_a_forged_or_damaged_cursor_is_refused(cursor: str) -> None:
    with pytest.raises(Invalid) as refused:
        CODEC.decode("tasks:-due_at", cursor, 2)
    assert [e.field for e in refused.value.errors] == ["cursor"]


def test_a_cursor_belongs_to_one_list_and_one_deployment() -> None:
    cursor = CODEC.encode("webhooks", [ObjectId()])
    for scope, size in (("deliveries", 1), ("webhooks", 2)):
        with pytest.raises(Invalid):
            CODEC.decode(scope, cursor, size)
    other = CursorCodec.of(Settings(app_env="test", jwt_secret="another-secret-" + "y" * 40))
    with pytest.raises(Invalid):
        other.decode("webhooks", cursor, 1)


async def _walk(
    ctx: Any, flt: dict[str, Any], sort: list[tuple[str, int]], limit: int
) -> list[Any]:
    seen: list[Any] = []
    cursor: str | None = None
    while True:
        q = PageQuery(limit=limit, cursor=cursor)
        docs, cursor = await keyset_page(ctx, "things", flt, q, scope="things", sort=sort)
        assert len(docs) <= limit
        seen += [d["_id"] for d in docs]
        if cursor is None:
            return seen


@pytest.mark.parametrize("direction", [ASCENDING, DESCENDING])
async def test_pages_cover_a_list_with_ties_once_in_order(ctx: Any, direction: int) -> None:
    start = datetime(2030, 1, 1, tzinfo=UTC)
    docs = [
        {"_id": ObjectId(), "kind": "a" if i % 4 else "b", "at": start + timedelta(hours=i % 3)}
        for i in range(23)
    ]
    await ctx.store["things"].insert_many(docs)
    sort = [("at", direction), ("_id", direction)]
    everything = await ctx.store["things"].find({"kind": "a"}).sort(sort).to_list()
    for limit in (1, 4, 17, 50):
        assert await _walk(ctx, {"kind": "a"}, sort, limit) == [d["_id"] for d in everything]
    newest_first = sorted((d["_id"] for d in docs), reverse=True)
    assert await _walk(ctx, {}, [("_id", DESCENDING)], 5) == newest_first


def test_the_next_page_is_asked_without_or() -> None:
    """One plain range per sort key, nearest first (an ``$or`` scans the whole collection on
    the test server); a sort key the filter already holds is AND-ed, not overwritten."""
    when, oid = datetime(2030, 1, 1, tzinfo=UTC), ObjectId()
    sort = [("at", ASCENDING), ("_id", ASCENDING)]
    assert after({"kind": "a"}, sort, [when, oid]) == [
        {"kind": "a", "at": when, "_id": {"$gt": oid}},
        {"kind": "a", "at": {"$gt": when}},
    ]
    bounded = {"at": {"$lt": when + timedelta(days=1)}}
    assert after(bounded, [("at", DESCENDING), ("_id", DESCENDING)], [when, oid]) == [
        {"$and": [bounded, {"at": when, "_id": {"$lt": oid}}]},
        {"$and": [bounded, {"at": {"$lt": when}}]},
    ]


@pytest.mark.parametrize("direction", [ASCENDING, DESCENDING])
async def test_pages_under_a_filter_on_the_sort_key_and_three_keys(
    ctx: Any, direction: int
) -> None:
    start = datetime(2030, 1, 1, tzinfo=UTC)
    docs = [
        {"_id": ObjectId(), "rank": i % 2, "at": start + timedelta(hours=i % 3)} for i in range(30)
    ]
    await ctx.store["things"].insert_many(docs)
    flt = {"at": {"$gte": start + timedelta(hours=1)}}
    for sort in (
        [("at", direction), ("_id", direction)],
        [("rank", direction), ("at", direction), ("_id", direction)],
    ):
        everything = await ctx.store["things"].find(flt).sort(sort).to_list()
        assert len(everything) == 20
        for limit in (1, 3, 7, 19, 20):
            assert await _walk(ctx, flt, sort, limit) == [d["_id"] for d in everything]


async def test_a_page_refuses_a_cursor_of_another_list(ctx: Any) -> None:
    await ctx.store["things"].insert_many([{"n": i} for i in range(3)])
    _, cursor = await keyset_page(ctx, "things", {}, PageQuery(limit=1), scope="things")
    assert cursor is not None
    with pytest.raises(Invalid):
        await keyset_page(ctx, "things", {}, PageQuery(cursor=cursor), scope="others")
