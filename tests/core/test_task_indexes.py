"""Every task list query shape is served by a declared index that starts with the owner.

Runs ``explain()`` on the test server with the index ``core.tasks.list_query`` names for the
shape as a hint: the named index is declared, starts with the owner and serves the shape. The
product sends these queries unhinted (on SecantusDB a hinted index is walked whole, across
owners), and SecantusDB's ``explain()`` of an unhinted query reports COLLSCAN even where it
answers through an index, so the unhinted cost is measured where it shows: ``bench/api.py``
(``GET /tasks?status=todo``) and ``bench/pipeline.py`` (the first page the cache actor
computes after every write, at 1,000 and 20,000 tasks stored). We do not assert the absence
of a SORT stage: SecantusDB adds an in-memory sort even over an index whose order matches,
while mongod walks the index in order.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, get_args

import pytest

from config.connections import Connections
from core import tasks
from core.store import INDEXES, Store
from core.task_models import Sort, TaskQuery
from tests.core.plans import scans

SORTS = get_args(Sort)
FILTERS: list[dict[str, Any]] = [
    {},
    {"status": "todo"},
    {"priority": "high"},
    {"tag": "work"},
    {"overdue": True},
    {"overdue": False},
    {"due_before": datetime(2030, 1, 1, tzinfo=UTC), "due_after": datetime(2020, 1, 1, tzinfo=UTC)},
    {"status": "done", "tag": "home", "priority": "low"},
]


@pytest.fixture
async def store(settings: Any) -> Any:
    store = Store(Connections(settings).mongo(), settings.mongodb_db)
    await store.ensure_indexes()
    await store["tasks"].insert_many(
        [
            {
                "owner": f"u{i % 3}",
                "title": str(i),
                "status": "todo",
                "priority": "low",
                "priority_rank": 0,
                "tags": ["work"],
                "created_at": datetime.now(UTC),
                "updated_at": datetime.now(UTC),
                "due_key": tasks.NO_DUE,
                "due_at": None,
                "version": 1,
            }
            for i in range(30)
        ]
    )
    yield store
    await store.client.close()


@pytest.mark.parametrize("sort", SORTS)
@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: ",".join(f) or "none")
async def test_list_query_uses_an_owner_index(
    store: Store, sort: str, filters: dict[str, Any]
) -> None:
    q = TaskQuery(sort=sort, **filters)  # type: ignore[arg-type]
    flt, order, index = tasks.list_query("u1", q, datetime.now(UTC))
    ixscans, _ = await scans(store["tasks"].find(flt).sort(order).hint(index).limit(51))
    assert ixscans
    declared = {ix.document["name"]: list(ix.document["key"]) for ix in INDEXES["tasks"]}
    index = ixscans[0]["indexName"]
    assert index in declared, index
    assert declared[index][0] == "owner"
