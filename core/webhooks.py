"""Webhooks: a user's HTTP endpoints that receive their task events, signed and retried.

What lives here is the pure part, shared by the web process and the workers: the models, CRUD,
signing, secret storage and the delivery log. The HTTP POST itself is made by the worker
(``workers/webhooks.py``), since ``core`` never imports aiohttp. The target check (SSRF: which
URLs and addresses may receive deliveries) is :mod:`core.ssrf`.

Secrets. ``secrets.token_urlsafe(32)``, shown once at creation. The worker needs the secret
itself to sign, so it is stored recoverably: sealed with AES-256-GCM under a key derived from
``JWT_SECRET`` and bound to the webhook's id, so a database copy or a backup alone reveals
nothing. Rotating ``JWT_SECRET`` therefore makes existing secrets unreadable: their deliveries
go ``dead`` with a clear error and the webhooks must be registered again.

Deliveries. One record per (event, webhook), ``_id = "<event id>:<webhook id>"``, so a fan-out
that runs twice creates one. A delivery moves ``pending`` → ``succeeded``, or ``failed``
(retrying with backoff) → ``dead`` when retries are exhausted; a redelivery request puts it
back to ``pending`` under a new ``generation``, which makes messages of older generations
stale. An attempt is made under a short lease, so two messages for one delivery never post at
the same time, and a ``succeeded`` delivery is never sent again by a duplicate message.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from bson import Binary, ObjectId
from bson.errors import InvalidId
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from pymongo import DESCENDING, ReturnDocument
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import DuplicateKeyError, PyMongoError

from config.settings import Settings
from core import events
from core.context import Context
from core.errors import Conflict, NotFound
from core.pagination import decode_cursor, encode_cursor

# ``X as X``: the target check is re-exported, callers name it ``webhooks.check_target``, ...
from core.ssrf import MAX_URL_LENGTH as MAX_URL_LENGTH
from core.ssrf import Resolver, system_resolve
from core.ssrf import Target as Target
from core.ssrf import TargetRefused as TargetRefused
from core.ssrf import TargetUnresolvable as TargetUnresolvable
from core.ssrf import check_target as check_target
from core.ssrf import check_url as check_url
from core.ssrf import refusal as refusal
from core.store import Doc, utcnow
from core.task_models import PageQuery

EventType = Literal["task.created", "task.updated", "task.completed", "task.deleted", "*"]
#: The event types a webhook can receive ("*" subscribes to all of them).
EVENT_TYPES: tuple[str, ...] = ("task.created", "task.updated", "task.completed", "task.deleted")
ALL_EVENTS = "*"
#: Recorded with a redelivery request; the relay routes it to the ``redeliver_webhook`` actor.
REDELIVERY_EVENT = "webhook.redelivery_requested"

MAX_WEBHOOKS_PER_USER = 20
#: How much of a receiver's response body is read, and kept in the delivery log.
EXCERPT_BYTES = 1024
#: How long delivery records are kept (TTL index on ``expires_at``).
DELIVERY_RETENTION = timedelta(days=30)
USER_AGENT = "taskmanager-webhooks/1"

DeliveryStatus = Literal["pending", "failed", "succeeded", "dead"]


class SecretUnreadable(Exception):
    """A stored secret cannot be opened (``JWT_SECRET`` changed since it was sealed)."""


# --- models ---------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class WebhookCreate(_Strict):
    """``POST /webhooks`` body."""

    url: Annotated[str, StringConstraints(min_length=1, max_length=MAX_URL_LENGTH)]
    events: Annotated[list[EventType], Field(min_length=1, max_length=len(EVENT_TYPES) + 1)]

    _url = field_validator("url")(check_url)

    @field_validator("events")
    @classmethod
    def _events(cls, value: list[str]) -> list[str]:
        return [ALL_EVENTS] if ALL_EVENTS in value else list(dict.fromkeys(value))


class WebhookPublic(BaseModel):
    """A webhook as the API shows it (never with its secret)."""

    id: str
    url: str
    events: list[str]
    created_at: datetime


class WebhookCreated(WebhookPublic):
    """The answer to ``POST /webhooks``: the only time the signing secret is shown."""

    secret: str


class WebhookPage(BaseModel):
    """One page of webhooks, newest first."""

    items: list[WebhookPublic]
    next_cursor: str | None


class DeliveryPublic(BaseModel):
    """One entry of a webhook's delivery log."""

    id: str
    webhook_id: str
    event_id: str
    event: str
    status: DeliveryStatus
    attempts: int
    redeliveries: int
    response_code: int | None
    response_excerpt: str | None
    last_error: str | None
    created_at: datetime
    last_attempt_at: datetime | None
    delivered_at: datetime | None


class DeliveryPage(BaseModel):
    """One page of a webhook's deliveries, newest event first."""

    items: list[DeliveryPublic]
    next_cursor: str | None


def public(doc: Doc) -> WebhookPublic:
    """The public view of a stored webhook."""
    return WebhookPublic(
        id=str(doc["_id"]), url=doc["url"], events=doc["events"], created_at=doc["created_at"]
    )


def delivery_public(doc: Doc) -> DeliveryPublic:
    """The public view of a stored delivery."""
    return DeliveryPublic(
        id=doc["_id"],
        webhook_id=doc["webhook_id"],
        event_id=doc["event_id"],
        event=doc["event"],
        status=doc["status"],
        attempts=doc.get("attempts", 0),
        redeliveries=doc.get("generation", 0),
        response_code=doc.get("response_code"),
        response_excerpt=doc.get("response_excerpt"),
        last_error=doc.get("last_error"),
        created_at=doc["created_at"],
        last_attempt_at=doc.get("last_attempt_at"),
        delivered_at=doc.get("delivered_at"),
    )


# --- secrets and signatures -----------------------------------------------------------------


def new_secret() -> str:
    """A fresh signing secret."""
    return secrets.token_urlsafe(32)


def _secret_key(settings: Settings) -> bytes:
    root = settings.jwt_secret.get_secret_value().encode()
    return hmac.new(root, b"taskmanager/webhooks/secret", hashlib.sha256).digest()


def seal_secret(settings: Settings, webhook_id: str, secret: str) -> Binary:
    """Encrypt a webhook's secret for storage, bound to the webhook's id."""
    nonce = secrets.token_bytes(12)
    sealed = AESGCM(_secret_key(settings)).encrypt(nonce, secret.encode(), webhook_id.encode())
    return Binary(nonce + sealed)


def open_secret(settings: Settings, webhook_id: str, sealed: bytes) -> str:
    """Decrypt a stored secret; :class:`SecretUnreadable` after a ``JWT_SECRET`` change."""
    raw = bytes(sealed)
    try:
        plain = AESGCM(_secret_key(settings)).decrypt(raw[:12], raw[12:], webhook_id.encode())
    except (InvalidTag, ValueError) as exc:
        raise SecretUnreadable(
            "The webhook's secret cannot be decrypted (JWT_SECRET changed?); register the "
            "webhook again"
        ) from exc
    return plain.decode()


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """``X-Webhook-Signature``: ``sha256=`` + hex HMAC-SHA256 of ``"<timestamp>.<body>"``."""
    message = str(timestamp).encode() + b"." + body
    return "sha256=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def verify(
    secret: str,
    timestamp: str,
    body: bytes,
    signature: str,
    *,
    tolerance: int = 300,
    now: float | None = None,
) -> bool:
    """What a receiver does: check the signature, and that the timestamp is recent."""
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, ts, body), signature)


def request_headers(delivery: Doc, secret: str, timestamp: int) -> dict[str, str]:
    """The headers of one delivery attempt (its body is ``delivery["body"]``)."""
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        # The event's id, the same across retries and redeliveries: receivers dedupe on it.
        "X-Webhook-Id": delivery["event_id"],
        "X-Webhook-Event": delivery["event"],
        "X-Webhook-Timestamp": str(timestamp),
        "X-Webhook-Signature": sign(secret, timestamp, delivery["body"].encode()),
        "X-Webhook-Delivery": delivery["_id"],
    }


def event_body(event: dict[str, Any]) -> str:
    """The JSON body delivered for an event (as sent to actors by the relay)."""
    return json.dumps(
        {
            "id": event["id"],
            "event": event["type"],
            "created_at": event["created_at"],
            "data": event.get("data", {}),
        },
        separators=(",", ":"),
    )


# --- webhooks (CRUD) ------------------------------------------------------------------------


def oid(webhook_id: str) -> ObjectId:
    """A webhook id, or :class:`NotFound`."""
    try:
        return ObjectId(webhook_id)
    except (InvalidId, TypeError) as exc:
        raise NotFound("No such webhook") from exc


def _cursor_secret(ctx: Context) -> bytes:
    return ctx.settings.jwt_secret.get_secret_value().encode()


async def create(
    ctx: Context, owner: str, body: WebhookCreate, *, resolve: Resolver = system_resolve
) -> tuple[Doc, str]:
    """Register a webhook; returns the stored document and its secret (shown once).

    The per-user limit is checked by a count before the insert, so concurrent registrations
    can overshoot it by a few; it guards against abuse, not against an exact number.
    """
    hooks = ctx.store["webhooks"]
    if await hooks.count_documents({"owner": owner}) >= MAX_WEBHOOKS_PER_USER:
        raise Conflict(f"At most {MAX_WEBHOOKS_PER_USER} webhooks per user; delete one first")
    await check_target(body.url, ctx.settings.webhook_allow_hosts, resolve=resolve)
    secret = new_secret()
    webhook_id = ObjectId()
    now = utcnow()
    doc: Doc = {
        "_id": webhook_id,
        "owner": owner,
        "url": body.url,
        "events": body.events,
        "secret": seal_secret(ctx.settings, str(webhook_id), secret),
        "created_at": now,
        "updated_at": now,
    }
    await hooks.insert_one(doc)
    return doc, secret


async def get(ctx: Context, owner: str, webhook_id: str) -> Doc:
    """One of the owner's webhooks, or :class:`NotFound`."""
    doc = await ctx.store["webhooks"].find_one({"_id": oid(webhook_id), "owner": owner})
    if doc is None:
        raise NotFound("No such webhook")
    return doc


async def list_page(ctx: Context, owner: str, q: PageQuery) -> WebhookPage:
    """The owner's webhooks, newest first."""
    flt: Doc = {"owner": owner}
    if q.cursor:
        _, last_id = decode_cursor(_cursor_secret(ctx), "webhooks", q.cursor)
        flt["_id"] = {"$lt": last_id}
    docs = await (
        ctx.store["webhooks"].find(flt).sort("_id", DESCENDING).limit(q.limit + 1).to_list()
    )
    more = len(docs) > q.limit
    docs = docs[: q.limit]
    cursor = encode_cursor(_cursor_secret(ctx), "webhooks", None, docs[-1]["_id"]) if more else None
    return WebhookPage(items=[public(d) for d in docs], next_cursor=cursor)


async def delete(ctx: Context, owner: str, webhook_id: str) -> None:
    """Delete a webhook and its delivery log; pending deliveries are dropped."""
    hook_id = oid(webhook_id)
    result = await ctx.store["webhooks"].delete_one({"_id": hook_id, "owner": owner})
    if result.deleted_count != 1:
        raise NotFound("No such webhook")
    await ctx.store["webhook_deliveries"].delete_many({"webhook_id": str(hook_id)})


async def deliveries_page(ctx: Context, owner: str, webhook_id: str, q: PageQuery) -> DeliveryPage:
    """A webhook's delivery log, newest event first (404 unless the webhook is the owner's)."""
    hook = await get(ctx, owner, webhook_id)
    flt: Doc = {"webhook_id": str(hook["_id"])}
    if q.cursor:
        _, last_id = decode_cursor(_cursor_secret(ctx), "deliveries", q.cursor)
        flt["event_oid"] = {"$lt": last_id}
    docs = await (
        ctx.store["webhook_deliveries"]
        .find(flt)
        .sort("event_oid", DESCENDING)
        .limit(q.limit + 1)
        .to_list()
    )
    more = len(docs) > q.limit
    docs = docs[: q.limit]
    cursor = (
        encode_cursor(_cursor_secret(ctx), "deliveries", None, docs[-1]["event_oid"])
        if more
        else None
    )
    return DeliveryPage(items=[delivery_public(d) for d in docs], next_cursor=cursor)


async def request_redelivery(ctx: Context, owner: str, webhook_id: str, delivery_id: str) -> Doc:
    """Put a delivery back to ``pending`` under a new generation and record the request in
    the outbox (the relay routes it to the worker), in one transaction."""
    hook = await get(ctx, owner, webhook_id)
    now = utcnow()

    async def work(session: AsyncClientSession) -> Doc | None:
        doc = await ctx.store["webhook_deliveries"].find_one_and_update(
            {"_id": delivery_id, "webhook_id": str(hook["_id"]), "owner": owner},
            {
                "$inc": {"generation": 1},
                "$set": {
                    "status": "pending",
                    "attempts": 0,
                    "response_code": None,
                    "response_excerpt": None,
                    "last_error": None,
                    "updated_at": now,
                    "expires_at": now + DELIVERY_RETENTION,
                },
                "$unset": {"lease_until": "", "lease_token": "", "dead_at": ""},
            },
            return_document=ReturnDocument.AFTER,
            session=session,
        )
        if doc is None:
            return None
        event = events.new_event(
            REDELIVERY_EVENT,
            user_id=owner,
            subject_id=delivery_id,
            data={"delivery_id": delivery_id, "generation": doc["generation"]},
        )
        await events.record(ctx.store, [event], session)
        return doc

    doc = await ctx.store.transaction(work)
    if doc is None:
        raise NotFound("No such delivery")
    return doc


# --- fan-out and the delivery log (used by the worker) --------------------------------------


async def matching(ctx: Context, user_id: str, event_type: str) -> list[Doc]:
    """The user's webhooks subscribed to ``event_type``."""
    if event_type not in EVENT_TYPES:
        return []
    flt = {"owner": user_id, "events": {"$in": [event_type, ALL_EVENTS]}}
    return await ctx.store["webhooks"].find(flt).to_list()


def delivery_id_for(event_id: str, webhook_id: str) -> str:
    """The delivery of one event to one webhook (its dedupe key)."""
    return f"{event_id}:{webhook_id}"


async def ensure_delivery(ctx: Context, hook: Doc, event: dict[str, Any]) -> tuple[Doc, bool]:
    """Create the delivery of ``event`` to ``hook`` unless it exists; returns it and whether
    it still has to be enqueued (created now, or created by a run that stopped before
    enqueueing)."""
    webhook_id = str(hook["_id"])
    delivery_id = delivery_id_for(event["id"], webhook_id)
    now = utcnow()
    fresh: Doc = {
        "_id": delivery_id,
        "webhook_id": webhook_id,
        "owner": hook["owner"],
        "event_id": event["id"],
        "event_oid": ObjectId(event["id"]),
        "event": event["type"],
        "body": event_body(event),
        "status": "pending",
        "attempts": 0,
        "generation": 0,
        "created_at": now,
        "updated_at": now,
        "expires_at": now + DELIVERY_RETENTION,
    }
    coll = ctx.store["webhook_deliveries"]
    # DuplicateKeyError: a concurrent fan-out of the same event inserted it first.
    with contextlib.suppress(DuplicateKeyError):
        await coll.update_one({"_id": delivery_id}, {"$setOnInsert": fresh}, upsert=True)
    doc = await coll.find_one({"_id": delivery_id})
    if doc is None:  # the webhook was deleted meanwhile
        return fresh, False
    return doc, doc.get("enqueued_at") is None


async def mark_enqueued(ctx: Context, delivery_id: str) -> None:
    """Note that the first message of a delivery was sent to the broker."""
    await ctx.store["webhook_deliveries"].update_one(
        {"_id": delivery_id}, {"$set": {"enqueued_at": utcnow()}}
    )


async def claim(
    ctx: Context, delivery_id: str, generation: int, lease: timedelta
) -> tuple[Doc, str] | Literal["busy"] | None:
    """Take the right to attempt a delivery now, under a lease: ``(delivery, lease token)``;
    ``"busy"`` while another message holds the lease; ``None`` when there is nothing to do
    (the delivery is gone, already succeeded, or of another generation: a stale message)."""
    now = utcnow()
    token = secrets.token_hex(8)
    coll = ctx.store["webhook_deliveries"]
    live: Doc = {"_id": delivery_id, "generation": generation, "status": {"$ne": "succeeded"}}
    doc = await coll.find_one_and_update(
        {**live, "$or": [{"lease_until": None}, {"lease_until": {"$lt": now}}]},
        {"$set": {"lease_until": now + lease, "lease_token": token}},
        return_document=ReturnDocument.AFTER,
    )
    if doc is not None:
        return doc, token
    return "busy" if await coll.count_documents(live, limit=1) else None


async def release(ctx: Context, delivery_id: str, token: str) -> None:
    """Give a lease back without logging an attempt (the attempt broke off); best effort."""
    with contextlib.suppress(PyMongoError):  # if it fails, the lease runs out by itself
        await ctx.store["webhook_deliveries"].update_one(
            {"_id": delivery_id, "lease_token": token},
            {"$unset": {"lease_until": "", "lease_token": ""}},
        )


@dataclass(frozen=True)
class Attempt:
    """The outcome of one POST to a receiver."""

    ok: bool
    response_code: int | None = None
    excerpt: str | None = None
    error: str | None = None


async def record_attempt(
    ctx: Context, delivery_id: str, token: str, attempt: Attempt, status: DeliveryStatus
) -> bool:
    """Log an attempt made under the lease ``token`` and release the lease; ``False`` when
    the lease was lost (a redelivery was requested meanwhile)."""
    now = utcnow()
    fields: Doc = {
        "status": status,
        "response_code": attempt.response_code,
        "response_excerpt": attempt.excerpt,
        "last_error": attempt.error,
        "last_attempt_at": now,
        "updated_at": now,
    }
    if status == "succeeded":
        fields["delivered_at"] = now
    if status == "dead":
        fields["dead_at"] = now
    result = await ctx.store["webhook_deliveries"].update_one(
        {"_id": delivery_id, "lease_token": token},
        {"$set": fields, "$inc": {"attempts": 1}, "$unset": {"lease_until": "", "lease_token": ""}},
    )
    return result.modified_count == 1


async def mark_dead(ctx: Context, delivery_id: str, generation: int) -> bool:
    """Retries are exhausted: the delivery is ``dead`` (unless it succeeded or was
    redelivered meanwhile)."""
    now = utcnow()
    result = await ctx.store["webhook_deliveries"].update_one(
        {"_id": delivery_id, "generation": generation, "status": {"$ne": "succeeded"}},
        {"$set": {"status": "dead", "dead_at": now, "updated_at": now}},
    )
    return result.modified_count == 1


async def forget(ctx: Context, delivery_id: str) -> None:
    """Drop a delivery whose webhook no longer exists."""
    await ctx.store["webhook_deliveries"].delete_one({"_id": delivery_id})
