"""Tasks: a user's to-do items.

Every change is written in one transaction with its event (the activity log and outbox), and
guarded by a ``version`` field so concurrent changes never overwrite each other silently: a
stale ``If-Match`` gets 412, and a change without one is re-read and re-applied.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from bson import ObjectId
from bson.errors import InvalidId
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pymongo import ASCENDING, DESCENDING, UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession

from core import cache, events
from core.context import Context
from core.errors import NotFound, PreconditionFailed
from core.pagination import after, decode_cursor, encode_cursor
from core.store import Doc, utcnow

Status = Literal["todo", "in_progress", "done"]
Priority = Literal["low", "medium", "high", "urgent"]
PRIORITY_RANK: dict[str, int] = {"low": 0, "medium": 1, "high": 2, "urgent": 3}
Sort = Literal[
    "created_at",
    "-created_at",
    "due_at",
    "-due_at",
    "priority",
    "-priority",
    "updated_at",
    "-updated_at",
]
#: Stored sort keys. ``due_key`` is ``due_at`` or a far-future sentinel, so tasks without a due
#: date sort last (ascending) and keyset pagination never meets a null.
SORT_FIELDS = {
    "created_at": "created_at",
    "due_at": "due_key",
    "priority": "priority_rank",
    "updated_at": "updated_at",
}
NO_DUE = datetime(9999, 12, 31, tzinfo=UTC)
#: The index (declared in core/store.py) that serves each sort.
SORT_INDEXES = {
    "created_at": "owner_created",
    "due_key": "owner_due",
    "priority_rank": "owner_priority",
    "updated_at": "owner_updated",
}
MAX_BULK = 500

Title = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Description = Annotated[str, StringConstraints(max_length=10_000)]
Tag = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=50)]
Tags = Annotated[list[Tag], Field(max_length=20)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _unique_tags(tags: list[str] | None) -> list[str] | None:
    return list(dict.fromkeys(tags)) if tags is not None else None


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    try:
        return value.astimezone(UTC)
    except OverflowError as exc:  # e.g. 0001-01-01T00:00+01:00: a 422, not a 500
        raise ValueError("Date is out of range once converted to UTC") from exc


def _utc_ms(value: datetime | None) -> datetime | None:
    value = _utc(value)
    if value is None:
        return None
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


class TaskCreate(_Strict):
    """``POST /tasks`` body."""

    title: Title
    description: Description = ""
    status: Status = "todo"
    priority: Priority = "medium"
    due_at: AwareDatetime | None = None
    tags: Tags = []

    _tags = field_validator("tags")(_unique_tags)
    _due = field_validator("due_at")(_utc_ms)


class TaskUpdate(_Strict):
    """``PATCH /tasks/{id}`` body: any subset; ``null`` clears ``description`` and ``due_at``."""

    # SkipJsonSchema: the document must not offer null where the validator below refuses it.
    title: Title | SkipJsonSchema[None] = None
    description: Description | None = None
    status: Status | SkipJsonSchema[None] = None
    priority: Priority | SkipJsonSchema[None] = None
    due_at: AwareDatetime | None = None
    tags: Tags | SkipJsonSchema[None] = None

    _tags = field_validator("tags")(_unique_tags)
    _due = field_validator("due_at")(_utc_ms)

    @model_validator(mode="after")
    def _no_null_required(self) -> TaskUpdate:
        for name in ("title", "status", "priority", "tags"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null")
        return self

    def changes(self) -> dict[str, Any]:
        """The fields the client sent, ``description: null`` meaning empty."""
        out = {name: getattr(self, name) for name in self.model_fields_set}
        if "description" in out and out["description"] is None:
            out["description"] = ""
        return out


class BulkSet(_Strict):
    """Fields a bulk change may set (none may be null)."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1})

    status: Status | SkipJsonSchema[None] = None
    priority: Priority | SkipJsonSchema[None] = None
    tags: Tags | SkipJsonSchema[None] = None

    _tags = field_validator("tags")(_unique_tags)

    @model_validator(mode="after")
    def _no_null(self) -> BulkSet:
        for name in self.model_fields_set:
            if getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null")
        return self


class BulkRequest(_Strict):
    """``POST /tasks/bulk`` body: ``set`` some fields, or ``delete``."""

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {
                    "required": ["set"],
                    "properties": {"set": {"type": "object"}, "delete": {"const": False}},
                },
                {
                    "required": ["delete"],
                    "properties": {"set": {"type": "null"}, "delete": {"const": True}},
                },
            ]
        }
    )

    ids: Annotated[
        list[Annotated[str, StringConstraints(max_length=64)]],
        Field(min_length=1, max_length=MAX_BULK),
    ]
    set: BulkSet | None = None
    delete: bool = False

    @model_validator(mode="after")
    def _one_action(self) -> BulkRequest:
        if self.delete == (self.set is not None):
            raise ValueError("give exactly one of 'set' or 'delete: true'")
        if self.set is not None and not self.set.model_fields_set:
            raise ValueError("'set' needs at least one field")
        return self


class TaskQuery(BaseModel):
    """``GET /tasks`` query (strings from the URL, so lax types; unknown names refused)."""

    model_config = ConfigDict(extra="forbid")

    status: Status | None = None
    priority: Priority | None = None
    tag: Tag | None = None
    due_before: AwareDatetime | None = None
    due_after: AwareDatetime | None = None
    overdue: bool | None = None
    sort: Sort = "-created_at"
    limit: int = Field(50, ge=1, le=200)
    cursor: Annotated[str, StringConstraints(max_length=512)] | None = None

    _due = field_validator("due_before", "due_after")(_utc)


class PageQuery(BaseModel):
    """A plain cursor-paginated list query."""

    model_config = ConfigDict(extra="forbid")

    limit: int = Field(50, ge=1, le=200)
    cursor: Annotated[str, StringConstraints(max_length=512)] | None = None


class TaskPublic(BaseModel):
    """A task as the API shows it."""

    id: str
    title: str
    description: str
    status: Status
    priority: Priority
    due_at: datetime | None
    tags: list[str]
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None


class TaskPage(BaseModel):
    """One page of tasks."""

    items: list[TaskPublic]
    next_cursor: str | None


class BulkResult(BaseModel):
    """What happened to one id of a bulk request."""

    id: str
    result: Literal["updated", "unchanged", "deleted", "not_found"]


class BulkResponse(BaseModel):
    """Per-id results, in request order."""

    results: list[BulkResult]


class ActivityItem(BaseModel):
    """One event in a task's history."""

    id: str
    type: str
    actor_id: str | None
    data: dict[str, Any]
    created_at: datetime


class ActivityPage(BaseModel):
    """A page of a task's history, newest first."""

    items: list[ActivityItem]
    next_cursor: str | None


class Stats(BaseModel):
    """Counts over the caller's tasks."""

    total: int
    by_status: dict[str, int]
    by_priority: dict[str, int]
    overdue: int
    due_today: int


def public(doc: Doc) -> TaskPublic:
    """The public view of a stored task."""
    return TaskPublic(
        id=str(doc["_id"]),
        title=doc["title"],
        description=doc.get("description", ""),
        status=doc["status"],
        priority=doc["priority"],
        due_at=doc.get("due_at"),
        tags=doc.get("tags", []),
        created_at=doc["created_at"],
        updated_at=doc["updated_at"],
        completed_at=doc.get("completed_at"),
    )


def etag(doc: Doc) -> str:
    """The strong ETag of a task's current version."""
    return f'"{doc["_id"]}.{doc["version"]}"'


def oid(task_id: str) -> ObjectId:
    """A task id, or :class:`NotFound` (a malformed id names no task)."""
    try:
        return ObjectId(task_id)
    except (InvalidId, TypeError) as exc:
        raise NotFound("No such task") from exc


def _snapshot(doc: Doc) -> dict[str, Any]:
    return public(doc).model_dump(mode="json")


def _derived(fields: dict[str, Any], current_status: str | None, now: datetime) -> dict[str, Any]:
    """Stored keys that follow from the public fields (sort keys, completion time)."""
    out: dict[str, Any] = {}
    if "due_at" in fields:
        out["due_key"] = fields["due_at"] or NO_DUE
    if "priority" in fields:
        out["priority_rank"] = PRIORITY_RANK[fields["priority"]]
    status = fields.get("status")
    if status is not None and status != current_status:
        out["completed_at"] = now if status == "done" else None
    return out


async def create(ctx: Context, owner: str, body: TaskCreate) -> Doc:
    """Store a new task with its ``task.created`` event."""
    now = utcnow()
    fields = body.model_dump()
    doc: Doc = {
        "_id": ObjectId(),
        "owner": owner,
        **fields,
        "created_at": now,
        "updated_at": now,
        "version": 1,
        "completed_at": None,
    }
    doc.update(_derived(fields, None, now))
    event = events.new_event(
        "task.created", user_id=owner, subject_id=str(doc["_id"]), data={"task": _snapshot(doc)}
    )

    async def work(session: AsyncClientSession) -> None:
        await ctx.store["tasks"].insert_one(doc, session=session)
        await events.record(ctx.store, [event], session)

    await ctx.store.transaction(work)
    await cache.bump(ctx, owner)
    return doc


async def get(ctx: Context, owner: str, task_id: str) -> Doc:
    """One of the owner's tasks, or :class:`NotFound`."""
    # Looked up by _id alone, the owner checked here: an extra field in the filter makes some
    # planners (SecantusDB) leave the _id index for a collection scan.
    doc = await ctx.store["tasks"].find_one({"_id": oid(task_id)})
    if doc is None or doc.get("owner") != owner:
        raise NotFound("No such task")
    return doc


def matches(doc: Doc, if_match: str | None) -> bool:
    """RFC 9110 strong comparison of ``If-Match`` against the task's ETag."""
    if if_match is None:
        return True
    tags = [t.strip() for t in if_match.split(",")]
    return "*" in tags or etag(doc) in tags


def _diff(doc: Doc, changes: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in changes.items() if doc.get(k) != v}


def _change_events(owner: str, before: Doc, diff: dict[str, Any], after_doc: Doc) -> list[Doc]:
    task_id = str(before["_id"])
    old, new = _snapshot(before), _snapshot(after_doc)
    changed = {k: {"from": old.get(k), "to": new.get(k)} for k in diff}
    evs = [
        events.new_event(
            "task.updated",
            user_id=owner,
            subject_id=task_id,
            data={"changes": changed, "task": new},
        )
    ]
    if "status" in diff and diff["status"] == "done":
        evs.append(
            events.new_event(
                "task.completed", user_id=owner, subject_id=task_id, data={"task": new}
            )
        )
    return evs


async def update(
    ctx: Context, owner: str, task_id: str, changes: dict[str, Any], if_match: str | None
) -> Doc:
    """Apply ``changes``; 412 if ``if_match`` is stale. Without ``if_match``, a concurrent
    change is re-read and the patch re-applied on top of it (never lost)."""
    for _ in range(5):
        doc = await get(ctx, owner, task_id)
        if not matches(doc, if_match):
            raise PreconditionFailed("The task changed since you read it (If-Match failed)")
        diff = _diff(doc, changes)
        if not diff:
            return doc
        now = utcnow()
        new_fields = {**diff, **_derived(diff, doc["status"], now), "updated_at": now}
        after_doc = {**doc, **new_fields, "version": doc["version"] + 1}
        evs = _change_events(owner, doc, diff, after_doc)

        async def work(
            session: AsyncClientSession,
            doc: Doc = doc,
            new_fields: Doc = new_fields,
            evs: list[Doc] = evs,
        ) -> bool:
            result = await ctx.store["tasks"].update_one(
                {"_id": doc["_id"], "version": doc["version"]},
                {"$set": new_fields, "$inc": {"version": 1}},
                session=session,
            )
            if result.modified_count != 1:
                return False
            await events.record(ctx.store, evs, session)
            return True

        if await ctx.store.transaction(work):
            await cache.bump(ctx, owner)
            return after_doc
        if if_match is not None and "*" not in if_match:
            raise PreconditionFailed("The task changed since you read it (If-Match failed)")
    raise PreconditionFailed("The task is changing too fast; retry")


async def delete(ctx: Context, owner: str, task_id: str, if_match: str | None) -> None:
    """Delete a task (412 if ``if_match`` is stale) with its ``task.deleted`` event."""
    doc = await get(ctx, owner, task_id)
    if not matches(doc, if_match):
        raise PreconditionFailed("The task changed since you read it (If-Match failed)")
    event = events.new_event(
        "task.deleted", user_id=owner, subject_id=task_id, data={"task": _snapshot(doc)}
    )

    async def work(session: AsyncClientSession) -> bool:
        result = await ctx.store["tasks"].delete_one(
            {"_id": doc["_id"], "version": doc["version"]}, session=session
        )
        if result.deleted_count != 1:
            return False
        await events.record(ctx.store, [event], session)
        return True

    if not await ctx.store.transaction(work):
        raise PreconditionFailed("The task changed while it was being deleted; retry")
    await cache.bump(ctx, owner)


def list_filter(owner: str, q: TaskQuery, now: datetime) -> Doc:
    """The MongoDB filter of a list query (always owner-scoped)."""
    flt: Doc = {"owner": owner}
    if q.status is not None:
        flt["status"] = q.status
    if q.priority is not None:
        flt["priority"] = q.priority
    if q.tag is not None:
        flt["tags"] = q.tag
    due: Doc = {}
    if q.due_before is not None:
        due["$lt"] = q.due_before
    if q.due_after is not None:
        due["$gt"] = q.due_after
    if q.overdue is True:
        due["$lt"] = min(due.get("$lt", now), now)
        flt["status"] = {"$ne": "done"} if q.status is None else q.status
    elif q.overdue is False:
        flt["$nor"] = [{"due_at": {"$lt": now}, "status": {"$ne": "done"}}]
    if due:
        flt["due_at"] = due
    return flt


def sort_spec(sort: str) -> tuple[str, bool]:
    """``(stored field, descending)`` of a sort parameter."""
    descending = sort.startswith("-")
    return SORT_FIELDS[sort.lstrip("-")], descending


def _secret(ctx: Context) -> bytes:
    return ctx.settings.jwt_secret.get_secret_value().encode()


def list_query(owner: str, q: TaskQuery, now: datetime) -> tuple[Doc, list[tuple[str, int]], str]:
    """``(filter, sort, index name)`` of one page of a list query.

    The index is named (a hint) because the sort decides it: each sort has its own
    ``owner``-first index, and the filters (status, tag, ...) are applied while walking it.
    Without the hint a planner may prefer a collection scan plus an in-memory sort.
    """
    field, descending = sort_spec(q.sort)
    flt = list_filter(owner, q, now)
    direction = DESCENDING if descending else ASCENDING
    return flt, [(field, direction), ("_id", direction)], SORT_INDEXES[field]


#: The list a client opens first: served from the cache (see :func:`list_page`).
FIRST_PAGE = TaskQuery()


async def list_page(ctx: Context, owner: str, q: TaskQuery) -> TaskPage:
    """One page of the owner's tasks, keyset-paginated on ``(sort key, _id)``.

    The first page of the default list is cache-aside like the stats: it is what every client
    opens first, and the cache generation makes it exact after each write.
    """
    if q == FIRST_PAGE:
        page, _ = await cache.cached(
            ctx, "first_page", owner, TaskPage, lambda: _first_page(ctx, owner)
        )
        return page
    return await _query_page(ctx, owner, q)


async def _first_page(ctx: Context, owner: str) -> tuple[TaskPage, float]:
    return await _query_page(ctx, owner, FIRST_PAGE), time.time() + cache.TTL_SECONDS


async def warm(ctx: Context, owner: str) -> None:
    """Precompute what a client reads next (stats and the first page) into the cache."""
    await stats(ctx, owner)
    await list_page(ctx, owner, FIRST_PAGE)


async def _query_page(ctx: Context, owner: str, q: TaskQuery) -> TaskPage:
    flt, sort, index = list_query(owner, q, utcnow())
    field, descending = sort_spec(q.sort)
    if q.cursor:
        value, last_id = decode_cursor(_secret(ctx), q.sort, q.cursor)
        flt = {"$and": [flt, after(field, value, last_id, descending)]}
    docs = await ctx.store["tasks"].find(flt).sort(sort).hint(index).limit(q.limit + 1).to_list()
    more = len(docs) > q.limit
    docs = docs[: q.limit]
    cursor = encode_cursor(_secret(ctx), q.sort, docs[-1][field], docs[-1]["_id"]) if more else None
    return TaskPage(items=[public(d) for d in docs], next_cursor=cursor)


async def activity(ctx: Context, owner: str, task_id: str, q: PageQuery) -> ActivityPage:
    """A task's events, newest first (404 unless the task exists and is the owner's)."""
    await get(ctx, owner, task_id)
    flt: Doc = {"user_id": owner, "subject_id": task_id}
    if q.cursor:
        _, last_id = decode_cursor(_secret(ctx), "activity", q.cursor)
        flt["_id"] = {"$lt": last_id}
    docs = await ctx.store["events"].find(flt).sort("_id", DESCENDING).limit(q.limit + 1).to_list()
    more = len(docs) > q.limit
    docs = docs[: q.limit]
    items = [
        ActivityItem(
            id=str(d["_id"]),
            type=d["type"],
            actor_id=d.get("actor_id"),
            data=d.get("data", {}),
            created_at=d["created_at"],
        )
        for d in docs
    ]
    cursor = encode_cursor(_secret(ctx), "activity", None, docs[-1]["_id"]) if more else None
    return ActivityPage(items=items, next_cursor=cursor)


class _Stale(Exception):
    """A task changed between the read and the write of a bulk change."""


async def bulk(ctx: Context, owner: str, req: BulkRequest) -> BulkResponse:
    """Apply one change to many of the owner's tasks in one transaction; others' ids and
    malformed ids are reported ``not_found`` and never touched. A task changed concurrently
    makes the whole change re-read and re-apply (never a silent lost update)."""
    for _ in range(5):
        try:
            return await _bulk_once(ctx, owner, req)
        except _Stale:
            continue
    raise PreconditionFailed("These tasks are changing too fast; retry")


async def _bulk_once(ctx: Context, owner: str, req: BulkRequest) -> BulkResponse:
    wanted: dict[str, ObjectId | None] = {}
    for raw in req.ids:
        try:
            wanted[raw] = ObjectId(raw)
        except (InvalidId, TypeError):
            wanted[raw] = None
    oids = [o for o in wanted.values() if o is not None]
    # By _id alone, owner checked here (see get()): others' tasks are never touched.
    found = {
        str(d["_id"]): d
        async for d in ctx.store["tasks"].find({"_id": {"$in": oids}})
        if d.get("owner") == owner
    }
    results: dict[str, Literal["updated", "unchanged", "deleted", "not_found"]] = {}
    writes: list[UpdateOne] = []
    deletes: list[ObjectId] = []
    evs: list[Doc] = []
    now = utcnow()
    changes = req.set.model_dump(include=req.set.model_fields_set) if req.set else {}
    for raw in wanted:
        doc = found.get(raw)
        if doc is None:
            results[raw] = "not_found"
        elif req.delete:
            deletes.append(doc["_id"])
            evs.append(
                events.new_event(
                    "task.deleted", user_id=owner, subject_id=raw, data={"task": _snapshot(doc)}
                )
            )
            results[raw] = "deleted"
        else:
            diff = _diff(doc, changes)
            if not diff:
                results[raw] = "unchanged"
                continue
            new_fields = {**diff, **_derived(diff, doc["status"], now), "updated_at": now}
            writes.append(
                UpdateOne(
                    {"_id": doc["_id"], "version": doc["version"]},
                    {"$set": new_fields, "$inc": {"version": 1}},
                )
            )
            evs.extend(
                _change_events(
                    owner, doc, diff, {**doc, **new_fields, "version": doc["version"] + 1}
                )
            )
            results[raw] = "updated"

    async def work(session: AsyncClientSession) -> None:
        if writes:
            result = await ctx.store["tasks"].bulk_write(writes, ordered=False, session=session)
            if result.modified_count != len(writes):
                raise _Stale  # aborts the transaction: nothing of this attempt is kept
        if deletes:
            await ctx.store["tasks"].delete_many({"_id": {"$in": deletes}}, session=session)
        await events.record(ctx.store, evs, session)

    if writes or deletes:
        await ctx.store.transaction(work)
        await cache.bump(ctx, owner)
    return BulkResponse(results=[BulkResult(id=i, result=r) for i, r in results.items()])


async def stats(ctx: Context, owner: str) -> tuple[Stats, bool]:
    """The owner's stats, from the cache when current; returns ``(stats, cache hit)``."""
    return await cache.cached(ctx, "stats", owner, Stats, lambda: compute_stats(ctx, owner))


async def compute_stats(
    ctx: Context, owner: str, now: datetime | None = None
) -> tuple[Stats, float]:
    """Count the owner's tasks from MongoDB; also returns until when the counts hold without
    writes (the next open task falling due or overdue, or midnight UTC)."""
    now = now or utcnow()
    tasks = ctx.store["tasks"]
    cursor = await tasks.aggregate(
        [
            {"$match": {"owner": owner}},
            {"$group": {"_id": {"s": "$status", "p": "$priority"}, "n": {"$sum": 1}}},
        ]
    )
    by_status = dict.fromkeys(("todo", "in_progress", "done"), 0)
    by_priority = dict.fromkeys(PRIORITY_RANK, 0)
    async for row in cursor:
        by_status[row["_id"]["s"]] += row["n"]
        by_priority[row["_id"]["p"]] += row["n"]
    day_start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    open_ = {"owner": owner, "status": {"$ne": "done"}}
    overdue = await tasks.count_documents({**open_, "due_key": {"$lt": now}})
    due_today = await tasks.count_documents(
        {**open_, "due_key": {"$gte": day_start, "$lt": day_start + timedelta(days=1)}}
    )
    next_due = await tasks.find_one(
        {**open_, "due_key": {"$gte": now, "$lt": NO_DUE}}, {"due_key": 1}, sort=[("due_key", 1)]
    )
    boundaries = [day_start + timedelta(days=1)]
    if next_due is not None:
        boundaries.append(next_due["due_key"] + timedelta(milliseconds=1))
    result = Stats(
        total=sum(by_status.values()),
        by_status=by_status,
        by_priority=by_priority,
        overdue=overdue,
        due_today=due_today,
    )
    return result, min(boundaries).timestamp()
