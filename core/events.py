"""Events: what happened to a domain object. Every type is an :class:`EventType` with a typed
payload (:data:`PAYLOADS`), the shape actors receive. One collection is both the activity log
and the outbox: an event is written in the same transaction as its change with
``pending: True``; the relay (``workers/relay.py``) hands it to the broker and clears
``pending``. A crash or a Redis
outage between write and enqueue therefore delays side effects but never drops them.

Outbox fields the relay maintains on an event: ``lease_until``/``lease_owner`` while a relay
holds it; ``attempts``, ``last_error`` and ``next_attempt_at`` after a failed send;
``dispatched_at`` once sent; ``set_aside_at`` (with ``pending`` cleared) once it failed too
many times. This module reads the outbox's lag and lists and replays set-aside events.

Receipts: which messages of an event finished. At dispatch the relay records on the event one
*awaited* entry per (event, actor) pair, keyed by the actor's name, each with a ``due`` time;
messages an actor sends while handling one of them (follow-ups, e.g. ``deliver_webhook``) are
awaited too, keyed ``<actor>:<message id>`` and stored with their encoded body. The workers'
``OutboxReceipts`` middleware adds a key to ``finished`` when its message succeeds or is
dead-lettered, and pushes ``due`` later when it is retried (to its retry's eta plus the bound).
The relay's sweep sends again every awaited message not finished by its ``due``
(:func:`claim_overdue`), so side effects survive a broker that loses its memory. Fields:
``awaiting`` ``{key: {actor, due, retries?, message?, resends?}}``, ``finished`` (keys),
``recheck_at`` (the earliest ``due`` of an unfinished entry; indexed, sparse) and
``receipts_rev`` (incremented by every receipt write, so sweeps update under compare-and-set).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Self

from bson import ObjectId
from bson.errors import InvalidId
from pydantic import BaseModel, ConfigDict, model_validator
from pymongo import ASCENDING, UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from structlog.contextvars import get_contextvars

from core.context import Context
from core.store import Doc, utcnow

# --- The catalogue of event types and their payloads ------------------------------------------


class EventType(StrEnum):
    """Every event type. Each carries the payload model :data:`PAYLOADS` names and is routed to
    actors by ``workers/catalogue.py``; producers name types only through this enum."""

    USER_REGISTERED = "user.registered"
    USER_LOGGED_IN = "user.logged_in"
    TASK_CREATED = "task.created"
    TASK_UPDATED = "task.updated"
    TASK_COMPLETED = "task.completed"
    TASK_DELETED = "task.deleted"
    WEBHOOK_REDELIVERY_REQUESTED = "webhook.redelivery_requested"


class UnknownEventType(ValueError):
    """An event whose ``type`` is not in :class:`EventType` (an older version reading a newer
    version's event, or a hand-written one)."""


class EventPayload(BaseModel):
    """What an actor receives for an event: the event's public JSON shape (:meth:`wire`),
    validated into the model :data:`PAYLOADS` names for its type. The relay builds it from the
    stored event (:func:`payload`); the worker parses the message back (:func:`parse`)."""

    model_config = ConfigDict(frozen=True)

    id: str
    type: EventType
    user_id: str
    actor_id: str | None = None
    subject_id: str | None = None
    #: When it happened: ISO 8601 in UTC with a ``Z`` (as receivers of webhooks see it).
    created_at: str
    request_id: str | None = None

    @model_validator(mode="after")
    def _of_its_type(self) -> Self:
        expected = PAYLOADS[self.type]
        if not isinstance(self, expected):
            raise ValueError(f"a {self.type} event carries {expected.__name__}")
        return self

    def wire(self) -> dict[str, Any]:
        """The JSON shape (as sent to actors): the fields it was built with."""
        return self.model_dump(exclude_unset=True)


class UserEvent(EventPayload):
    """``user.registered``, ``user.logged_in``: about the account ``user_id`` (no data)."""

    data: dict[str, Any] = {}


class TaskData(BaseModel):
    """A task event's data: the task's public JSON (after the change; as it was, for
    ``task.deleted``), and for ``task.updated`` the fields that changed, each as
    ``{"from": old public value, "to": new one}``."""

    model_config = ConfigDict(frozen=True, extra="allow")

    changes: dict[str, dict[str, Any]] | None = None
    task: dict[str, Any]


class TaskEvent(EventPayload):
    """``task.created``, ``task.updated``, ``task.completed``, ``task.deleted``: about the task
    ``subject_id`` of the user ``user_id``. Delivered to webhooks as they are."""

    subject_id: str
    data: TaskData


class RedeliveryData(BaseModel):
    """A redelivery request: the delivery and the generation to attempt."""

    model_config = ConfigDict(frozen=True, extra="allow")

    delivery_id: str
    generation: int


class WebhookRedeliveryEvent(EventPayload):
    """``webhook.redelivery_requested``: the user ``user_id`` asked for a delivery again."""

    data: RedeliveryData


#: The payload model of each event type.
PAYLOADS: dict[EventType, type[EventPayload]] = {
    EventType.USER_REGISTERED: UserEvent,
    EventType.USER_LOGGED_IN: UserEvent,
    EventType.TASK_CREATED: TaskEvent,
    EventType.TASK_UPDATED: TaskEvent,
    EventType.TASK_COMPLETED: TaskEvent,
    EventType.TASK_DELETED: TaskEvent,
    EventType.WEBHOOK_REDELIVERY_REQUESTED: WebhookRedeliveryEvent,
}
#: The task event types, in declaration order (the ones webhooks can subscribe to).
TASK_EVENT_TYPES: tuple[EventType, ...] = tuple(t for t in EventType if PAYLOADS[t] is TaskEvent)
_TYPE_VALUES = frozenset(t.value for t in EventType)


def parse(wire: Mapping[str, Any]) -> EventPayload:
    """Validate an event's JSON shape into its type's payload model; :class:`UnknownEventType`
    for a type not in the catalogue, pydantic's ``ValidationError`` (a ``ValueError``) for a
    payload that does not fit it."""
    raw = wire.get("type")
    model = PAYLOADS[EventType(raw)] if isinstance(raw, str) and raw in _TYPE_VALUES else None
    if model is None:
        raise UnknownEventType(f"{raw!r} is not an event type")
    return model.model_validate(wire)


def payload(event: Doc) -> EventPayload:
    """The payload of a stored event (``KeyError`` when it lacks an envelope field)."""
    return parse(public_event(event))


def new_event(
    type_: EventType,
    *,
    user_id: str,
    actor_id: str | None = None,
    subject_id: str | None = None,
    data: dict[str, Any] | None = None,
) -> Doc:
    """Build an event document (not yet stored); carries the current request id."""
    return {
        "_id": ObjectId(),
        "type": str(type_),
        "user_id": user_id,
        "actor_id": actor_id or user_id,
        "subject_id": subject_id,
        "data": data or {},
        "created_at": utcnow(),
        "request_id": get_contextvars().get("request_id"),
        "pending": True,
    }


async def record(ctx: Context, events: list[Doc], session: AsyncClientSession | None) -> None:
    """Store events (inside the caller's transaction when ``session`` is given)."""
    if events:
        await ctx.store["events"].insert_many(events, session=session)


def public_event(event: Doc) -> dict[str, Any]:
    """The JSON shape of a stored event, unvalidated (:func:`payload` validates it)."""
    return {
        "id": str(event["_id"]),
        "type": event["type"],
        "user_id": event["user_id"],
        "actor_id": event.get("actor_id"),
        "subject_id": event.get("subject_id"),
        "data": event.get("data", {}),
        "created_at": event["created_at"].isoformat().replace("+00:00", "Z"),
        "request_id": event.get("request_id"),
    }


class OutboxLag(BaseModel):
    """How far the outbox is behind: the age of its oldest pending event (``None`` when none is
    pending), how many events are pending and how many are set aside."""

    oldest_pending_age_seconds: float | None
    pending: int
    set_aside: int


class SetAsideEvent(BaseModel):
    """An event the relay stopped sending after repeated failures."""

    id: str
    type: str | None
    user_id: str | None
    subject_id: str | None
    created_at: datetime | None
    attempts: int
    error: str | None
    set_aside_at: datetime


class ReplayResult(BaseModel):
    """What :func:`replay_set_aside` put back in the outbox."""

    replayed: list[str]
    not_found: list[str]


async def outbox_lag(ctx: Context, known: tuple[int, datetime | None] | None = None) -> OutboxLag:
    """The outbox's lag, read through the ``outbox`` and ``set_aside`` indexes.

    The oldest pending event is the first in ``_id`` order; its age is measured from its
    ``created_at`` (never negative: an event from a fast clock counts as new). ``known``: the
    pending count and oldest ``created_at`` as a fair relay's view already holds them
    (``core/fairness.py``), so only the set-aside events are counted here: reading a long
    outbox costs SecantusDB a walk of the whole index range each time.
    """
    events = ctx.store["events"]
    if known is None:
        oldest = (
            await events.find({"pending": True}, {"created_at": 1})
            .sort("_id", ASCENDING)
            .limit(1)
            .to_list()
        )
        created = None
        if oldest:
            created = oldest[0].get("created_at") or oldest[0]["_id"].generation_time
        known = (await events.count_documents({"pending": True}), created)
    pending, created = known
    age = None if created is None else max(0.0, (utcnow() - created).total_seconds())
    return OutboxLag(
        oldest_pending_age_seconds=age,
        pending=pending,
        set_aside=await events.count_documents(_SET_ASIDE),
    )


async def list_set_aside(ctx: Context, *, limit: int = 50) -> list[SetAsideEvent]:
    """Set-aside events, the earliest set aside first."""
    docs = (
        await ctx.store["events"]
        .find(_SET_ASIDE)
        .sort([("set_aside_at", ASCENDING), ("_id", ASCENDING)])
        .limit(limit)
        .to_list()
    )
    return [
        SetAsideEvent(
            id=str(d["_id"]),
            type=_str_or_none(d.get("type")),
            user_id=_str_or_none(d.get("user_id")),
            subject_id=_str_or_none(d.get("subject_id")),
            created_at=d.get("created_at") if isinstance(d.get("created_at"), datetime) else None,
            attempts=int(d.get("attempts", 0)),
            error=d.get("last_error"),
            set_aside_at=d["set_aside_at"],
        )
        for d in docs
    ]


async def replay_set_aside(ctx: Context, ids: list[str] | None) -> ReplayResult:
    """Put set-aside events back in the outbox (every one when ``ids`` is ``None``) with their
    attempts reset; the relay sends them in its next round. Ids that are not set aside (never
    were, unknown or malformed, or already replayed) come back in ``not_found``."""
    events = ctx.store["events"]
    if ids is None:
        wanted = [d["_id"] for d in await events.find(_SET_ASIDE, {"_id": 1}).to_list()]
        not_found: list[str] = []
    else:
        wanted, not_found = [], []
        for raw in dict.fromkeys(ids):
            try:
                wanted.append(ObjectId(raw))
            except (InvalidId, TypeError):
                not_found.append(raw)
    replayed: list[str] = []
    for oid in wanted:
        # One event at a time, conditioned on it still being set aside: a concurrent replay of
        # the same id reports it as not found instead of replaying it twice.
        result = await events.update_one(
            {"_id": oid, **_SET_ASIDE},
            {
                "$set": {"pending": True, "attempts": 0, "replayed_at": utcnow()},
                "$unset": {"set_aside_at": "", "next_attempt_at": "", "last_error": ""},
            },
        )
        (replayed if result.modified_count else not_found).append(str(oid))
    return ReplayResult(replayed=replayed, not_found=not_found)


_SET_ASIDE: dict[str, Any] = {"set_aside_at": {"$exists": True}}


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


# --- Receipts: which messages of an event finished (see the module docstring) -------------------

#: The event fields of the receipts.
AWAITING, FINISHED, RECHECK_AT, RECEIPTS_REV = "awaiting", "finished", "recheck_at", "receipts_rev"
#: A message sent again and still not finished waits ``bound * 2**resends`` before the next
#: resend, the doubling capped at this many times (a queue backlog longer than the bound thus
#: costs a few duplicates per message, not one per bound).
MAX_DOUBLINGS = 6


def awaited_key(actor: str, message_id: str | None = None) -> str:
    """The key of an awaited message in ``awaiting``: the actor's name for a routed pair,
    ``<actor>:<message id>`` for a follow-up (dots and dollars, which MongoDB field names
    cannot hold, replaced)."""
    key = actor if message_id is None else f"{actor}:{message_id}"
    return key.replace(".", "_").replace("$", "_")


@dataclass(frozen=True)
class Expected:
    """A message an event awaits: ``key`` in ``awaiting``, sent to ``actor``, due by ``due``.

    ``message`` is the encoded body of a follow-up (``None`` for a routed pair, whose message
    is rebuilt from the event); ``retries`` the retries it has spent, carried into a resend.
    """

    key: str
    actor: str
    due: datetime
    message: str | None = None
    retries: int | None = None


@dataclass(frozen=True)
class Resend:
    """An awaited message not finished by its due time, claimed by a sweep to be sent again."""

    event: Doc
    key: str
    actor: str
    message: str | None
    retries: int
    resends: int


def receipt(finished: Iterable[str], expected: Iterable[Expected]) -> Doc:
    """The update recording that ``finished`` keys finished and ``expected`` messages are
    awaited (new ones, or retried ones alive until a later ``due``).

    Order-independent: a key finished before it is recorded as awaited stays finished, and a
    ``due`` only ever moves later (``$max``), so receipts may land in any order.
    """
    update: Doc = {"$inc": {RECEIPTS_REV: 1}}
    done = list(dict.fromkeys(finished))
    if done:
        update["$addToSet"] = {FINISHED: {"$each": done}}
    sets: Doc = {}
    maxes: Doc = {}
    earliest: datetime | None = None
    for item in expected:
        path = f"{AWAITING}.{item.key}"
        sets[f"{path}.actor"] = item.actor
        if item.message is not None:
            sets[f"{path}.message"] = item.message
        if item.retries is not None:
            sets[f"{path}.retries"] = item.retries
        maxes[f"{path}.due"] = max(item.due, maxes.get(f"{path}.due", item.due))
        earliest = item.due if earliest is None else min(earliest, item.due)
    if sets:
        update["$set"] = sets
        update["$max"] = maxes
    if earliest is not None:
        update["$min"] = {RECHECK_AT: earliest}
    return update


def merge_receipts(updates: Iterable[Doc]) -> Doc:
    """One update doing what the :func:`receipt` updates of one event do one after another:
    the finished keys united, each awaited field as the last sets it, the dues' ``$max`` and
    the recheck's ``$min`` kept, the revision moved by as many. A worker merges the receipts
    of one event waiting for the same flush, so the event (whose every index entry SecantusDB
    rewrites on each update) is written once rather than once per actor."""
    merged: Doc = {}
    for update in updates:
        for op, fields in update.items():
            into: Doc = merged.setdefault(op, {})
            for path, value in fields.items():
                if op == "$inc":
                    into[path] = into.get(path, 0) + value
                elif op == "$addToSet":
                    seen = into.setdefault(path, {"$each": []})["$each"]
                    seen.extend(k for k in value["$each"] if k not in seen)
                elif op == "$max":
                    into[path] = max(value, into.get(path, value))
                elif op == "$min":
                    into[path] = min(value, into.get(path, value))
                elif op == "$set":
                    into[path] = value
                else:
                    raise ValueError(f"not a receipt's operator: {op}")
    return merged


def unfinished(event: Doc) -> dict[str, Doc]:
    """The event's awaited entries whose key has not finished."""
    done = set(event.get(FINISHED) or ())
    awaiting: dict[str, Doc] = event.get(AWAITING) or {}
    return {k: v for k, v in awaiting.items() if k not in done and isinstance(v, dict)}


def overdue(event: Doc, now: datetime) -> list[str]:
    """The rule: the keys awaited, not finished, and due at or before ``now`` (an entry without
    a due time counts as due)."""
    return [k for k, v in unfinished(event).items() if v.get("due") is None or v["due"] <= now]


def resend_due(now: datetime, bound: timedelta, resends: int) -> datetime:
    """When a message sent again for the ``resends``-th time is due: ``now + bound * 2**(n-1)``
    (the doubling capped at :data:`MAX_DOUBLINGS`)."""
    factor: int = 2 ** min(max(resends - 1, 0), MAX_DOUBLINGS)
    return now + bound * factor


@dataclass(frozen=True)
class SweepPlan:
    """What a sweep does with one event: send ``resend`` again, then apply ``update`` (under
    the event's ``receipts_rev``)."""

    resend: list[Resend]
    update: Doc


def sweep_plan(event: Doc, now: datetime, bound: timedelta) -> SweepPlan:
    """Plan the sweep of one event whose ``recheck_at`` has come: overdue entries are sent
    again and due later; ``recheck_at`` moves to the earliest unfinished due, or is removed
    with ``awaiting`` when everything finished."""
    left = unfinished(event)
    if not left:
        return SweepPlan([], {"$unset": {AWAITING: "", RECHECK_AT: ""}, "$inc": {RECEIPTS_REV: 1}})
    sets: Doc = {}
    resend: list[Resend] = []
    for key in overdue(event, now):
        entry = left[key]
        count = int(entry.get("resends", 0)) + 1
        due = resend_due(now, bound, count)
        sets[f"{AWAITING}.{key}.due"] = due
        sets[f"{AWAITING}.{key}.resends"] = count
        left[key] = {**entry, "due": due}
        resend.append(
            Resend(
                event=event,
                key=key,
                actor=str(entry.get("actor") or key),
                message=entry.get("message"),
                retries=int(entry.get("retries") or 0),
                resends=count,
            )
        )
    dues = [v["due"] for v in left.values()]
    sets[RECHECK_AT] = min(dues)
    return SweepPlan(resend, {"$set": sets, "$inc": {RECEIPTS_REV: 1}})


async def claim_overdue(
    ctx: Context, now: datetime, bound: timedelta, *, limit: int = 200
) -> tuple[list[Resend], int]:
    """Claim the awaited messages overdue at ``now``; returns them and how many events were
    looked at (``limit`` of them at most, earliest ``recheck_at`` first, through the
    ``receipts`` index).

    Each event with something to resend is updated on its own under compare-and-set on
    ``receipts_rev``, so of several sweeping relays one claims it (a receipt landing meanwhile
    makes the claim miss; the next sweep looks again); the others' updates (clean-ups, later
    ``recheck_at``) go in one unordered bulk write under the same condition.
    """
    coll = ctx.store["events"]
    docs = (
        await coll.find({RECHECK_AT: {"$lte": now}})
        .sort(RECHECK_AT, ASCENDING)
        .limit(limit)
        .to_list()
    )
    claimed: list[Resend] = []
    quiet: list[UpdateOne] = []
    for doc in docs:
        plan = sweep_plan(doc, now, bound)
        cond = {"_id": doc["_id"], RECEIPTS_REV: doc.get(RECEIPTS_REV)}
        if not plan.resend:
            quiet.append(UpdateOne(cond, plan.update))
            continue
        result = await coll.update_one(cond, plan.update)
        if result.modified_count:
            claimed.extend(plan.resend)
    if quiet:
        await coll.bulk_write(quiet, ordered=False)
    return claimed, len(docs)


async def release(ctx: Context, resends: Iterable[Resend], retry_at: datetime) -> None:
    """Give back claimed messages that could not be sent (the broker is down): due again at
    ``retry_at``, their resend uncounted."""
    for item in resends:
        path = f"{AWAITING}.{item.key}"
        await ctx.store["events"].update_one(
            {"_id": item.event["_id"], f"{path}.resends": item.resends},
            {
                "$set": {f"{path}.due": retry_at, f"{path}.resends": item.resends - 1},
                "$min": {RECHECK_AT: retry_at},
                "$inc": {RECEIPTS_REV: 1},
            },
        )
