"""Full-text search over a user's tasks: the analyzer, the index and the ranked query.

The index (collection ``search_index``) holds one entry per task, ``_id`` = the task id::

    {_id, owner, version, analyzer, updated_at,
     terms: ["groceries", "gr", "gro", ..., "milk", "mi", "mil"],   # multikey, indexed
     w:     {"groceries": 6, "gr": 3, ..., "milk": 2, "mi": 1, ...}}  # score of each term

``terms`` are the normalised words of the title, tags and description (casefolded, NFKD with
accents stripped, split on anything that is not a letter or digit) and each word's prefixes of
2 to 15 characters. ``w[term]`` sums, over the fields, the field's weight (title 3, tags 2,
description 1) times 2 for a whole word or 1 for a prefix.

A search (:func:`search`) reads the owner's newest :data:`MAX_CANDIDATES` entries holding the
longest query word (index ``owner_terms``), keeps those holding every word (words are AND-ed,
each a prefix; a one-letter word matches only one-letter words), ranks them by score then
recency, and re-checks each against the task as stored (owner, current text), so a stale entry
never shows a task that is gone, another user's, or no longer matching. It answers the best
``limit`` (at most 50) hits, without a cursor.

Indexing (:func:`index_task`) reads the task as stored now and replaces its entry only over an
older version (or analyzer): duplicates and out-of-order events are harmless. A deleted task
leaves a tombstone (reaped after a day) so a late write cannot resurrect it. :func:`reindex`
rebuilds the index from ``tasks`` (``taskmanager reindex``). Why the index is shaped so:
docs/DESIGN.md, Design notes.
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated

from bson import ObjectId
from bson.errors import InvalidId
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from pymongo import ReplaceOne, UpdateOne
from pymongo.asynchronous.cursor import AsyncCursor
from pymongo.errors import BulkWriteError, DuplicateKeyError

from core.context import Context
from core.errors import FieldError, Invalid
from core.store import Doc, utcnow
from core.task_models import TaskPublic
from core.tasks import public

COLLECTION = "search_index"
INDEX_NAME = "owner_terms"
#: Bump when the analyzer changes: entries of an older analyzer are rewritten by the next event
#: or by ``taskmanager reindex``.
ANALYZER = 1
#: Field weights: a title hit outranks a tag hit, which outranks a description hit.
WEIGHTS = {"title": 3, "tags": 2, "description": 1}
EXACT, PREFIX = 2, 1
MIN_PREFIX = 2
MAX_PREFIX = 15
#: Bounds one task's entry (a 10 000-character description has rarely more than ~3 000 terms).
MAX_TERMS = 5_000
MAX_QUERY_WORDS = 10
MAX_QUERY_CHARS = 200
MAX_LIMIT = 50
MAX_CANDIDATES = 1_000
#: Above any task version: a tombstone is never overwritten by a stale write.
TOMBSTONE = 2**62

_WORD = re.compile(r"[^\W_]+")
_TASK_FIELDS = {"owner": 1, "version": 1, "title": 1, "tags": 1, "description": 1, "updated_at": 1}


class SearchQuery(BaseModel):
    """``GET /search`` query."""

    model_config = ConfigDict(extra="forbid")

    q: Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_QUERY_CHARS)
    ]
    limit: int = Field(20, ge=1, le=MAX_LIMIT)


class SearchHit(BaseModel):
    """One matching task and its score (higher is better)."""

    task: TaskPublic
    score: int


class SearchResults(BaseModel):
    """The best matches, best first; ``words`` are the normalised query words (for
    highlighting)."""

    items: list[SearchHit]
    words: list[str]


# -- the analyzer ---------------------------------------------------------------------------


def normalise(text: str) -> str:
    """Caseless, accentless form of ``text`` (NFKD, casefold, combining marks dropped)."""
    folded = unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", text).casefold())
    return "".join(ch for ch in folded if not unicodedata.combining(ch))


def words(text: str) -> list[str]:
    """The normalised words of ``text``, in order (runs of letters and digits)."""
    return _WORD.findall(normalise(text))


def query_words(q: str) -> list[str]:
    """The distinct words of a query, in order; more than :data:`MAX_QUERY_WORDS` is 422."""
    out = list(dict.fromkeys(words(q)))
    if len(out) > MAX_QUERY_WORDS:
        raise Invalid(
            f"Search for at most {MAX_QUERY_WORDS} words",
            [FieldError(field="q", message=f"At most {MAX_QUERY_WORDS} words")],
        )
    return out


def _key(word: str) -> str:
    """The index term a query word looks up (prefixes are stored up to MAX_PREFIX)."""
    return word[:MAX_PREFIX]


def _field_words(title: str, tags: Iterable[str], description: str) -> dict[str, list[str]]:
    return {
        "title": words(title),
        "tags": [w for tag in tags for w in words(tag)],
        "description": words(description),
    }


def term_weights(title: str, tags: Iterable[str], description: str) -> dict[str, int]:
    """Every index term of a task with its score; title, tags, then description terms first
    when :data:`MAX_TERMS` cuts."""
    levels: dict[str, dict[str, int]] = {}
    for field, field_words in _field_words(title, tags, description).items():
        for word in dict.fromkeys(field_words):
            if len(word) <= MAX_PREFIX:
                per = levels.setdefault(word, {})
                per[field] = EXACT
            for n in range(MIN_PREFIX, min(len(word), MAX_PREFIX + 1)):
                per = levels.setdefault(word[:n], {})
                per[field] = max(per.get(field, 0), PREFIX)
            if len(levels) >= MAX_TERMS:
                break
    weights = {
        term: sum(WEIGHTS[f] * level for f, level in per.items()) for term, per in levels.items()
    }
    return dict(list(weights.items())[:MAX_TERMS])


def score(query: list[str], title: str, tags: Iterable[str], description: str) -> int | None:
    """The score of a task for the query words, or None when some word matches nothing (AND).

    Computed from the task's current content with the same rule as :func:`term_weights`,
    except that words longer than :data:`MAX_PREFIX` are compared in full.
    """
    fields = {f: set(ws) for f, ws in _field_words(title, tags, description).items()}
    total = 0
    for q in query:
        points = 0
        for field, field_words in fields.items():
            if q in field_words:
                points += WEIGHTS[field] * EXACT
            elif len(q) >= MIN_PREFIX and any(w.startswith(q) for w in field_words):
                points += WEIGHTS[field] * PREFIX
        if not points:
            return None
        total += points
    return total


def entry(task: Doc) -> Doc:
    """The index document of a stored task."""
    weights = term_weights(task["title"], task.get("tags", []), task.get("description", ""))
    return {
        "_id": task["_id"],
        "owner": task["owner"],
        "version": task["version"],
        "analyzer": ANALYZER,
        "updated_at": task["updated_at"],
        "terms": list(weights),
        "w": weights,
        "indexed_at": utcnow(),
    }


# -- writing ----------------------------------------------------------------------------------


def _guard(entry_: Doc, version: Doc | int, analyzer: Doc | None = None) -> Doc:
    """The filter matching ``entry_``'s stored entry when its version matches ``version``
    (and its analyzer ``analyzer``).

    Never ``$or``: a filter combining ``_id`` with ``$or`` (or ``$nor``, ``$expr``) makes
    SecantusDB scan the whole collection (50 ms at 5,000 entries against 1 ms), so one
    ``(version, analyzer)`` comparison is two filters tried in turn. The owner is in every
    filter: a sharded cluster (shard key: owner) requires it in upserts."""
    flt: Doc = {"_id": entry_["_id"], "owner": entry_["owner"], "version": version}
    if analyzer is not None:
        flt["analyzer"] = analyzer
    return flt


def _older(entry_: Doc) -> Doc:
    """Matches the stored entry only if it is of an older version than ``entry_``."""
    return _guard(entry_, {"$lt": entry_["version"]})


def _older_analyzer(entry_: Doc) -> Doc:
    """Matches the stored entry only if it is of ``entry_``'s version and an older analyzer."""
    return _guard(entry_, entry_["version"], {"$lt": ANALYZER})


def _not_newer(entry_: Doc) -> Doc:
    """Matches the stored entry only if it is of an older or the same version (a rebuild
    rewrites equal versions)."""
    return _guard(entry_, {"$lte": entry_["version"]})


async def _put(ctx: Context, entry_: Doc) -> bool:
    """Write one entry unless an entry of a newer version (or of the same version and
    analyzer) is stored; True when written. One operation when the stored entry is older or
    missing, the usual case."""
    col = ctx.store[COLLECTION]
    try:
        result = await col.replace_one(_older(entry_), entry_, upsert=True)
    except DuplicateKeyError:
        # An entry exists that the filter did not match: newer or equal (nothing to do, unless
        # only its analyzer is older), or one inserted concurrently after our filter ran
        # (replace it if older).
        result = await col.replace_one(_older(entry_), entry_)
        if not result.modified_count:
            result = await col.replace_one(_older_analyzer(entry_), entry_)
    return bool(result.upserted_id is not None or result.modified_count)


async def tombstone(ctx: Context, tasks: list[tuple[ObjectId, str]]) -> int:
    """Replace the entries of deleted tasks, given as ``(task id, owner)``, with tombstones
    (upserted: a write still in flight for a task read just before its deletion must not land
    afterwards)."""
    if not tasks:
        return 0
    now = utcnow()
    ops = [
        UpdateOne(
            {"_id": tid, "owner": owner, "version": {"$lt": TOMBSTONE}},
            {
                "$set": {"version": TOMBSTONE, "terms": [], "deleted_at": now},
                "$unset": {"w": "", "updated_at": ""},
            },
            upsert=True,
        )
        for tid, owner in tasks
    ]
    try:
        result = await ctx.store[COLLECTION].bulk_write(ops, ordered=False)
    except BulkWriteError as exc:
        _raise_unless_duplicates(exc)
        return int(exc.details.get("nModified", 0)) + int(exc.details.get("nUpserted", 0))
    return result.modified_count + result.upserted_count


def _raise_unless_duplicates(exc: BulkWriteError) -> list[int]:
    """The indexes of the operations that hit a duplicate key; raise on any other error."""
    errors = exc.details.get("writeErrors", [])
    if any(e.get("code") != 11000 for e in errors) or exc.details.get("writeConcernErrors"):
        raise exc
    return [int(e["index"]) for e in errors]


def _task_oid(task_id: str) -> ObjectId:
    try:
        return ObjectId(task_id)
    except (InvalidId, TypeError) as exc:
        raise Invalid(f"Not a task id: {task_id!r}") from exc


async def index_task(ctx: Context, task_id: str, owner: str) -> str:
    """Bring the entry of ``owner``'s task up to date with the task as stored now.

    Safe to run twice, late or out of order: returns ``"indexed"``, ``"current"`` (a newer or
    equal entry was already there) or ``"removed"`` (the task is gone).
    """
    tid = _task_oid(task_id)
    task = await ctx.store["tasks"].find_one({"_id": tid}, _TASK_FIELDS)
    if task is None or task["owner"] != owner:
        await tombstone(ctx, [(tid, owner)])
        return "removed"
    return "indexed" if await _put(ctx, entry(task)) else "current"


# -- reindex ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReindexResult:
    """What a rebuild did."""

    tasks: int
    written: int
    removed: int
    seconds: float


async def count_tasks(ctx: Context, owner: str | None = None) -> int:
    """How many tasks a rebuild will visit."""
    return await ctx.store["tasks"].count_documents({"owner": owner} if owner else {})


async def _put_many(ctx: Context, entries: list[Doc]) -> int:
    """Write a batch (each only over an older or equal version); returns how many were
    written."""
    col = ctx.store[COLLECTION]
    ops = [ReplaceOne(_not_newer(e), e, upsert=True) for e in entries]
    try:
        result = await col.bulk_write(ops, ordered=False)
        return result.modified_count + result.upserted_count
    except BulkWriteError as exc:
        clashed = _raise_unless_duplicates(exc)
        written = int(exc.details.get("nModified", 0)) + int(exc.details.get("nUpserted", 0))
    # Same reasoning as _put: retry the clashes as plain conditional replaces.
    retry = [ReplaceOne(_not_newer(entries[i]), entries[i]) for i in clashed]
    if retry:
        written += (await col.bulk_write(retry, ordered=False)).modified_count
    return written


async def reindex(
    ctx: Context,
    owner: str | None = None,
    *,
    batch_size: int = 500,
    progress: Callable[[int], object] | None = None,
) -> ReindexResult:
    """Rebuild the index from ``tasks`` (all users, or one), safe while the platform serves.

    Tasks are streamed (a plain scan; ``owner_created`` for one user) and written in batches
    with the same version guard as the actors, so an edit racing the rebuild always wins.
    Then entries whose task is gone become tombstones. ``progress(n)`` is called per batch.
    """
    started = time.monotonic()
    scope: Doc = {"owner": owner} if owner else {}
    cursor = ctx.store["tasks"].find(scope, _TASK_FIELDS, batch_size=batch_size)
    if owner:
        cursor = cursor.sort([("created_at", -1), ("_id", -1)])  # walks owner_created
    tasks = written = 0
    batch: list[Doc] = []

    async def flush() -> int:
        count = await _put_many(ctx, [entry(t) for t in batch])
        if progress is not None:
            progress(len(batch))
        batch.clear()
        return count

    async for task in cursor:
        batch.append(task)
        tasks += 1
        if len(batch) >= batch_size:
            written += await flush()
    if batch:
        written += await flush()
    removed = await _remove_orphans(ctx, scope, batch_size)
    return ReindexResult(tasks, written, removed, time.monotonic() - started)


async def _remove_orphans(ctx: Context, scope: Doc, batch_size: int) -> int:
    """Tombstone the live entries (in ``scope``) whose task is gone."""
    # The filter names only indexed fields (owner_id, or a plain scan of every entry):
    # tombstones are skipped here rather than in the filter, which would cost the test
    # server's planner its index.
    cursor = ctx.store[COLLECTION].find(scope, {"owner": 1, "version": 1}, batch_size=batch_size)
    removed = 0
    page: list[Doc] = []

    async def flush() -> int:
        ids = [d["_id"] for d in page]
        found = {d["_id"] async for d in ctx.store["tasks"].find({"_id": {"$in": ids}}, {"_id": 1})}
        gone = [(d["_id"], d["owner"]) for d in page if d["_id"] not in found]
        page.clear()
        return await tombstone(ctx, gone)

    async for doc in cursor:
        if doc.get("version", TOMBSTONE) < TOMBSTONE:
            page.append(doc)
            if len(page) >= batch_size:
                removed += await flush()
    if page:
        removed += await flush()
    return removed


# -- the query --------------------------------------------------------------------------------


def candidates_cursor(ctx: Context, owner: str, query: list[str]) -> AsyncCursor[Doc]:
    """The index lookup of a search: the owner's newest entries holding the most selective
    (longest) query word's term, with the scores of every query word's term; the caller keeps
    those holding all of them (``explain()`` it to see the plan)."""
    keys = sorted({_key(w) for w in query}, key=lambda k: (-len(k), k))
    projection: Doc = {"updated_at": 1, **{f"w.{k}": 1 for k in keys}}
    return (
        ctx.store[COLLECTION]
        .find({"owner": owner, "terms": keys[0]}, projection)
        .sort("updated_at", -1)
        .limit(MAX_CANDIDATES)
    )


async def search(ctx: Context, owner: str, q: str, limit: int = 20) -> SearchResults:
    """The owner's tasks matching every word of ``q`` (each as a prefix), best first."""
    query = query_words(q)
    if not query:
        return SearchResults(items=[], words=[])
    keys = [_key(word) for word in query]
    candidates = [
        c
        for c in await candidates_cursor(ctx, owner, query).to_list()
        if all(k in c.get("w", {}) for k in keys)
    ]
    candidates.sort(key=lambda c: (sum(c["w"][k] for k in keys), c["updated_at"]), reverse=True)
    hits: list[tuple[int, Doc]] = []
    batch = limit + 10
    for start in range(0, len(candidates), batch):
        ids = [c["_id"] for c in candidates[start : start + batch]]
        # By _id alone (the _id index on any server), the owner checked here.
        found = {t["_id"]: t async for t in ctx.store["tasks"].find({"_id": {"$in": ids}})}
        for tid in ids:
            task = found.get(tid)
            if task is None or task["owner"] != owner:
                continue
            points = score(query, task["title"], task.get("tags", []), task.get("description", ""))
            if points is not None:
                hits.append((points, task))
        if len(hits) >= limit:
            break
    hits.sort(key=lambda h: (h[0], h[1]["updated_at"], str(h[1]["_id"])), reverse=True)
    items = [SearchHit(task=public(t), score=s) for s, t in hits[:limit]]
    return SearchResults(items=items, words=query)
