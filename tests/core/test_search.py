"""Search: the analyzer, ranking, ownership, version guard and query plan, against the real
MongoDB test server."""

from __future__ import annotations

from typing import Any

import pytest
from bson import ObjectId

from core import search, tasks
from core.context import Context
from core.errors import Invalid
from core.store import Doc
from core.task_models import TaskCreate
from tests.core.plans import scans

ME = "64b000000000000000000001"
OTHER = "64b000000000000000000002"


async def add(ctx: Context, owner: str = ME, *, index: bool = True, **fields: Any) -> Doc:
    """Create a task the way the API does, and index it as the actor would."""
    doc = await tasks.create(ctx, owner, TaskCreate(**{"title": "t", **fields}))
    if index:
        assert await search.index_task(ctx, str(doc["_id"]), owner) == "indexed"
    return doc


async def titles(ctx: Context, q: str, owner: str = ME, limit: int = 20) -> list[str]:
    result = await search.search(ctx, owner, q, limit)
    return [hit.task.title for hit in result.items]


# -- the analyzer ---------------------------------------------------------------------------


def test_words_casefold_strip_accents_and_split() -> None:
    assert search.words("Café-Crème  NAÏVE_straße ﬁle 42x") == [
        "cafe",
        "creme",
        "naive",
        "strasse",
        "file",
        "42x",
    ]
    assert search.words("  ¡¿ -- !! ") == []


def test_query_words_are_distinct_and_bounded() -> None:
    assert search.query_words("Milk milk MILK bread") == ["milk", "bread"]
    assert len(search.query_words(" ".join(f"w{i}" for i in range(10)))) == 10
    with pytest.raises(Invalid) as info:
        search.query_words(" ".join(f"w{i}" for i in range(11)))
    assert info.value.errors[0].field == "q"


def test_term_weights_exact_beats_prefix_and_fields_are_weighted() -> None:
    w = search.term_weights("Buy milk", ["groceries"], "from the market")
    assert w["milk"] == 3 * 2 and w["mil"] == 3 * 1  # title: whole word, prefix
    assert w["groceries"] == 2 * 2 and w["groc"] == 2 * 1  # tags
    assert w["market"] == 1 * 2 and w["mar"] == 1 * 1  # description
    assert "m" not in w  # prefixes start at two characters
    both = search.term_weights("plan", [], "planning")
    assert both["plan"] == 3 * 2 + 1 * 1  # summed over fields


def test_long_words_store_prefixes_up_to_the_cap() -> None:
    word = "internationalization"  # 20 characters
    w = search.term_weights(word, [], "")
    assert word[: search.MAX_PREFIX] in w
    assert word not in w and word[: search.MAX_PREFIX + 1] not in w


def test_score_requires_every_word() -> None:
    assert search.score(["milk", "bre"], "Buy milk", [], "and bread") == 6 + 1
    assert search.score(["milk", "eggs"], "Buy milk", [], "and bread") is None


# -- the index and the query ----------------------------------------------------------------


async def test_prefix_accent_and_case_insensitive_matching(ctx: Context) -> None:
    await add(ctx, title="Réunion budget Q3", tags=["Équipe"])
    assert await titles(ctx, "reu") == ["Réunion budget Q3"]
    assert await titles(ctx, "RÉUNION") == ["Réunion budget Q3"]
    assert await titles(ctx, "budg equi") == ["Réunion budget Q3"]
    assert await titles(ctx, "budgets") == []  # longer than any word: no match
    assert await titles(ctx, "--") == []


async def test_ranking_title_over_tags_over_description(ctx: Context) -> None:
    # Created best-last, so recency alone would give the reverse order.
    await add(ctx, title="in description", description="alpha release notes")
    await add(ctx, title="in tags", tags=["alpha"])
    await add(ctx, title="alpha in title")
    assert await titles(ctx, "alpha") == ["alpha in title", "in tags", "in description"]


async def test_whole_word_beats_prefix(ctx: Context) -> None:
    await add(ctx, title="plan the offsite")
    await add(ctx, title="planning poker")
    result = await search.search(ctx, ME, "plan")
    assert [h.task.title for h in result.items] == ["plan the offsite", "planning poker"]
    assert result.items[0].score > result.items[1].score
    assert result.words == ["plan"]


async def test_equal_scores_rank_newest_first_and_limit_applies(ctx: Context) -> None:
    for i in range(5):
        await add(ctx, title=f"report {i}")
    assert await titles(ctx, "rep", limit=3) == ["report 4", "report 3", "report 2"]


async def test_every_word_must_match(ctx: Context) -> None:
    await add(ctx, title="Buy milk")
    await add(ctx, title="Buy bread", description="and milk")
    await add(ctx, title="Bake bread")
    assert await titles(ctx, "mil bre") == ["Buy bread"]
    assert sorted(await titles(ctx, "bread")) == ["Bake bread", "Buy bread"]
    assert await titles(ctx, "milk cheese") == []


async def test_long_query_words_are_checked_in_full(ctx: Context) -> None:
    await add(ctx, title="internationalization work")
    assert await titles(ctx, "internationaliza") == ["internationalization work"]
    assert await titles(ctx, "internationalization") == ["internationalization work"]
    # Same first 15 characters, different afterwards: the index matches, the check does not.
    assert await titles(ctx, "internationalizing") == []


async def test_other_users_tasks_never_appear(ctx: Context) -> None:
    mine = await add(ctx, title="Quarterly review")
    theirs = await add(ctx, OTHER, title="Quarterly review")
    assert await titles(ctx, "quarterly") == ["Quarterly review"]
    [hit] = (await search.search(ctx, ME, "quarterly")).items
    assert hit.task.id == str(mine["_id"])
    # Even a corrupted entry claiming their task is mine does not reveal it: hits are fetched
    # from tasks with the owner filter.
    forged = search.entry({**theirs, "owner": ME, "_id": theirs["_id"]})
    await ctx.store[search.COLLECTION].replace_one({"_id": theirs["_id"]}, forged)
    [hit] = (await search.search(ctx, ME, "quarterly")).items
    assert hit.task.id == str(mine["_id"])


async def test_stale_writes_never_overwrite_newer_state(ctx: Context) -> None:
    v1 = await add(ctx, title="draft agenda")
    v2 = await tasks.update(ctx, ME, str(v1["_id"]), {"title": "final agenda"}, None)
    assert await search.index_task(ctx, str(v1["_id"]), ME) == "indexed"
    # A redelivered or late event re-reads the task: nothing to do.
    assert await search.index_task(ctx, str(v1["_id"]), ME) == "current"
    # Even a writer holding the old snapshot cannot put it back.
    assert not await search._put(ctx, search.entry(v1))
    assert not await search._put_many(ctx, [search.entry(v1)])
    stored = await ctx.store[search.COLLECTION].find_one({"_id": v1["_id"]})
    assert stored is not None and stored["version"] == v2["version"] == 2
    assert await titles(ctx, "draft") == []
    assert await titles(ctx, "final") == ["final agenda"]


async def test_an_older_analyzer_entry_is_rewritten_at_the_same_version(ctx: Context) -> None:
    doc = await add(ctx, title="migrate analyzer")
    await ctx.store[search.COLLECTION].update_one(
        {"_id": doc["_id"]}, {"$set": {"analyzer": search.ANALYZER - 1, "terms": [], "w": {}}}
    )
    assert await titles(ctx, "migr") == []
    assert await search.index_task(ctx, str(doc["_id"]), ME) == "indexed"
    assert await titles(ctx, "migr") == ["migrate analyzer"]


async def test_index_lag_never_shows_content_the_task_no_longer_has(ctx: Context) -> None:
    doc = await add(ctx, title="old words")
    await tasks.update(ctx, ME, str(doc["_id"]), {"title": "new title"}, None)
    assert await titles(ctx, "old") == []  # the stale entry still says "old"
    assert await titles(ctx, "new") == []  # not indexed yet: eventually consistent


async def test_deleted_task_disappears_and_cannot_come_back(ctx: Context) -> None:
    doc = await add(ctx, title="ephemeral note")
    snapshot = search.entry(doc)
    await tasks.delete(ctx, ME, str(doc["_id"]), None)
    assert await search.index_task(ctx, str(doc["_id"]), ME) == "removed"
    assert await titles(ctx, "ephem") == []
    stored = await ctx.store[search.COLLECTION].find_one({"_id": doc["_id"]})
    assert stored is not None and stored["terms"] == [] and stored["deleted_at"]
    # A slow actor that read the task just before the delete cannot resurrect it.
    assert not await search._put(ctx, snapshot)
    assert await titles(ctx, "ephem") == []
    # A deletion processed before the creation's message (out of order) leaves a tombstone too.
    assert await search.index_task(ctx, str(ObjectId()), ME) == "removed"


async def test_a_malformed_task_id_is_a_permanent_error(ctx: Context) -> None:
    with pytest.raises(Invalid):
        await search.index_task(ctx, "not-an-id", ME)


async def test_query_is_an_index_scan_of_the_owners_entries(ctx: Context) -> None:
    for i in range(12):
        await add(ctx, OTHER, title=f"shared words {i}")
    for i in range(3):
        await add(ctx, title=f"shared words mine {i}")
    await add(ctx, title="unrelated")
    candidates = search.candidates_cursor(ctx, ME, ["shared", "wor"])
    [ixscan], _ = await scans(candidates)
    plan = await candidates.explain()
    assert ixscan["indexName"] == search.INDEX_NAME
    assert next(iter(ixscan["keyPattern"])) == "owner"
    # Only my entries holding the lead term were read: not the other user's, not "unrelated".
    assert plan["executionStats"]["totalDocsExamined"] == 3
    assert plan["executionStats"]["nReturned"] == 3


# -- reindex ----------------------------------------------------------------------------------


async def test_reindex_rebuilds_everything_and_removes_deleted_tasks(ctx: Context) -> None:
    for i in range(7):
        await add(ctx, index=False, title=f"backlog item {i}")
    await add(ctx, OTHER, index=False, title="backlog of theirs")
    orphan = search.entry({**(await add(ctx, title="orphan entry")), "_id": ObjectId()})
    await ctx.store[search.COLLECTION].insert_one(orphan)
    await ctx.store["tasks"].delete_one({"title": "orphan entry"})
    assert await titles(ctx, "backlog") == []

    seen: list[int] = []
    result = await search.reindex(ctx, batch_size=3, progress=seen.append)
    assert (result.tasks, result.written) == (8, 8)
    assert seen == [3, 3, 2]
    assert result.removed == 2  # the orphan, and the entry of the deleted "orphan entry"
    assert len(await titles(ctx, "backlog")) == 7
    assert await titles(ctx, "backlog", OTHER) == ["backlog of theirs"]
    assert await titles(ctx, "orphan") == []
    # Idempotent: a second run rewrites the same entries and removes nothing more.
    again = await search.reindex(ctx, batch_size=3)
    assert (again.tasks, again.removed) == (8, 0)
    assert len(await titles(ctx, "backlog")) == 7


async def test_reindex_of_one_user_leaves_the_others_alone(ctx: Context) -> None:
    await add(ctx, index=False, title="mine to index")
    await add(ctx, OTHER, index=False, title="theirs to index")
    result = await search.reindex(ctx, ME)
    assert result.tasks == 1
    assert await titles(ctx, "index") == ["mine to index"]
    assert await titles(ctx, "index", OTHER) == []
    assert await search.count_tasks(ctx, OTHER) == 1
