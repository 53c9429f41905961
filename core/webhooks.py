"""Webhooks: a user's HTTP endpoints that receive their task events, signed and retried.

The part shared by the web process and the workers: models, CRUD, signing, secret storage and
the delivery log. The HTTP POST is made by the worker (``workers/webhooks.py``); which targets
may receive deliveries (SSRF) is :mod:`core.ssrf`.

Secrets (``secrets.token_urlsafe(32)``, shown once) are stored sealed with AES-256-GCM under a
key derived from ``JWT_SECRET``, bound to the webhook's id. After a ``JWT_SECRET`` rotation they
cannot be opened: their deliveries go ``dead`` with a clear error and the webhooks must be
registered again.

Deliveries: one record per (event, webhook), ``_id = "<event id>:<webhook id>"``, moving
``pending`` → ``succeeded``, or ``failed`` (retried with backoff) → ``dead``; a redelivery request
puts it back to ``pending`` under a new ``generation`` (older messages become stale). An attempt
holds a lease (:func:`claim`) naming its worker process (:class:`Holder`): a lease dies with its
worker's heartbeat (``WORKER_HEARTBEAT_TIMEOUT_MS``), and a message meeting a live lease waits
without spending a retry.

Isolation: deliveries have their own queue (``webhooks``) and worker pool; at most
``WEBHOOK_MAX_IN_FLIGHT_PER_USER`` of a user's deliveries are attempted at once
(:func:`take_slot`: Redis slots expiring with the lease or the worker's heartbeat); after
``WEBHOOK_BREAKER_FAILURES`` consecutive failed attempts a webhook is ``paused`` and its new
deliveries are ``held`` until ``POST /webhooks/{id}/resume`` sends them again, oldest first (up
to :data:`RESUME_REDELIVER_LIMIT`).
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
from typing import TYPE_CHECKING, Annotated, Any, Literal

from bson import Binary, ObjectId
from bson.errors import InvalidId
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from pymongo import ASCENDING, DESCENDING
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import DuplicateKeyError, PyMongoError
from redis.exceptions import RedisError

from config.settings import Settings
from core import events, ssrf
from core.context import Context
from core.errors import Conflict, NotFound
from core.pagination import Page, PageQuery, keyset_page
from core.security import Unsealable, derive_key, seal, unseal
from core.store import Doc, update_then_read, utcnow
from core.webhook_url import URL_PATTERN

#: The event types a webhook can receive: the task events of the catalogue (core/events.py);
#: "*" subscribes to all of them.
EVENT_TYPES: tuple[str, ...] = tuple(t.value for t in events.TASK_EVENT_TYPES)
ALL_EVENTS = "*"
if TYPE_CHECKING:
    Subscription = str
else:  # one of EVENT_TYPES or ALL_EVENTS (an enum in the OpenAPI document)
    Subscription = Literal[(*EVENT_TYPES, ALL_EVENTS)]

MAX_WEBHOOKS_PER_USER = 20
#: How much of a receiver's response body is read, and kept in the delivery log.
EXCERPT_BYTES = 1024
#: How long delivery records are kept (TTL index on ``expires_at``).
DELIVERY_RETENTION = timedelta(days=30)
USER_AGENT = "taskmanager-webhooks/1"

DeliveryStatus = Literal["pending", "failed", "succeeded", "dead", "held"]
WebhookState = Literal["active", "paused"]
#: How many held deliveries one ``resume`` sends again (oldest first); call it again for more.
RESUME_REDELIVER_LIMIT = 1000
#: Longest ``paused_reason`` kept.
_REASON_CHARS = 300
#: The fields of a delivery's lease (cleared when it is given back).
_LEASE_FIELDS = ("lease_until", "lease_token", "lease_worker", "leased_at")
_NO_LEASE: Doc = dict.fromkeys(_LEASE_FIELDS, "")


class SecretUnreadable(Exception):
    """A stored secret cannot be opened (``JWT_SECRET`` changed since it was sealed)."""


# --- models ---------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class WebhookCreate(_Strict):
    """``POST /webhooks`` body."""

    url: Annotated[
        str,
        StringConstraints(min_length=1, max_length=ssrf.MAX_URL_LENGTH),
        Field(
            description=(
                "An absolute http or https URL without credentials or fragment, in ASCII "
                "(xn-- host names); its host must resolve to public addresses only (private, "
                "loopback, link-local, shared, documentation and other special-purpose ranges "
                f"are refused, at registration and at every delivery); {ssrf.PORT_RULE}."
            ),
            # The syntax check_url enforces, stated for schema-driven clients.
            json_schema_extra={"pattern": URL_PATTERN},
        ),
    ]
    events: Annotated[list[Subscription], Field(min_length=1, max_length=len(EVENT_TYPES) + 1)]

    _url = field_validator("url")(ssrf.check_url)

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
    state: Annotated[
        WebhookState,
        Field(
            description=(
                "paused: the circuit breaker stopped deliveries after repeated failures "
                "(they are held; POST /webhooks/{id}/resume sends them)"
            )
        ),
    ] = "active"
    paused_reason: str | None = None
    paused_at: datetime | None = None


class WebhookResumed(WebhookPublic):
    """The answer to ``POST /webhooks/{id}/resume``."""

    redelivered: Annotated[
        int, Field(description="Held deliveries sent again by this request (oldest first)")
    ]


class WebhookCreated(WebhookPublic):
    """The answer to ``POST /webhooks``: the only time the signing secret is shown."""

    secret: str


class WebhookPage(Page[WebhookPublic]):
    """One page of webhooks, newest first."""


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


class DeliveryPage(Page[DeliveryPublic]):
    """One page of a webhook's deliveries, newest event first."""


def public(doc: Doc) -> WebhookPublic:
    """The public view of a stored webhook."""
    return WebhookPublic(
        id=str(doc["_id"]),
        url=doc["url"],
        events=doc["events"],
        created_at=doc["created_at"],
        state=doc.get("state", "active"),
        paused_reason=doc.get("paused_reason"),
        paused_at=doc.get("paused_at"),
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
    return derive_key(settings, "webhooks/secret")


def seal_secret(settings: Settings, webhook_id: str, secret: str) -> Binary:
    """Encrypt a webhook's secret for storage, bound to the webhook's id."""
    return Binary(seal(_secret_key(settings), secret.encode(), webhook_id))


def open_secret(settings: Settings, webhook_id: str, sealed: bytes) -> str:
    """Decrypt a stored secret; :class:`SecretUnreadable` after a ``JWT_SECRET`` change."""
    try:
        plain = unseal(_secret_key(settings), sealed, webhook_id)
    except Unsealable as exc:
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


async def create(
    ctx: Context, owner: str, body: WebhookCreate, *, resolve: ssrf.Resolver = ssrf.system_resolve
) -> tuple[Doc, str]:
    """Register a webhook; returns the stored document and its secret (shown once).

    The per-user limit is checked by a count before the insert, so concurrent registrations
    can overshoot it by a few; it guards against abuse, not against an exact number.
    """
    hooks = ctx.store["webhooks"]
    if await hooks.count_documents({"owner": owner}) >= MAX_WEBHOOKS_PER_USER:
        raise Conflict(f"At most {MAX_WEBHOOKS_PER_USER} webhooks per user; delete one first")
    await ssrf.check_target(body.url, ctx.settings.webhook_allow_hosts, resolve=resolve)
    secret = new_secret()
    webhook_id = ObjectId()
    now = utcnow()
    doc: Doc = {
        "_id": webhook_id,
        "owner": owner,
        "url": body.url,
        "events": body.events,
        "secret": seal_secret(ctx.settings, str(webhook_id), secret),
        "state": "active",
        "consecutive_failures": 0,
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
    docs, cursor = await keyset_page(ctx, "webhooks", {"owner": owner}, q, scope="webhooks")
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
    docs, cursor = await keyset_page(
        ctx,
        "webhook_deliveries",
        {"webhook_id": str(hook["_id"])},
        q,
        scope="deliveries",
        sort=[("event_oid", DESCENDING)],
    )
    return DeliveryPage(items=[delivery_public(d) for d in docs], next_cursor=cursor)


async def request_redelivery(ctx: Context, owner: str, webhook_id: str, delivery_id: str) -> Doc:
    """Put a delivery back to ``pending`` under a new generation and record the request in
    the outbox (the relay routes it to the worker), in one transaction."""
    hook = await get(ctx, owner, webhook_id)
    doc = await _redeliver(ctx, owner, str(hook["_id"]), delivery_id)
    if doc is None:
        raise NotFound("No such delivery")
    return doc


async def _redeliver(
    ctx: Context, owner: str, webhook_id: str, delivery_id: str, *, only: Doc | None = None
) -> Doc | None:
    """:func:`request_redelivery` of a delivery known to be the owner's (``only``: extra
    conditions on the delivery); ``None`` when it is not there (or no longer matches)."""
    now = utcnow()

    async def work(session: AsyncClientSession) -> Doc | None:
        doc = await update_then_read(
            ctx.store["webhook_deliveries"],
            {"_id": delivery_id, "webhook_id": webhook_id, "owner": owner, **(only or {})},
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
                "$unset": {**_NO_LEASE, "dead_at": "", "held_at": ""},
            },
            session=session,
        )
        if doc is None:
            return None
        event = events.new_event(
            events.EventType.WEBHOOK_REDELIVERY_REQUESTED,
            user_id=owner,
            subject_id=delivery_id,
            data={"delivery_id": delivery_id, "generation": doc["generation"]},
        )
        await events.record(ctx, [event], session)
        return doc

    return await ctx.store.transaction(work)


# --- the circuit breaker --------------------------------------------------------------------


async def resume(ctx: Context, owner: str, webhook_id: str) -> tuple[Doc, int]:
    """Make a webhook ``active`` again (idempotent) and send its held deliveries again,
    oldest first, at most :data:`RESUME_REDELIVER_LIMIT` per call; returns the webhook and how
    many deliveries were sent again."""
    hook_id = oid(webhook_id)
    doc = await update_then_read(
        ctx.store["webhooks"],
        {"_id": hook_id, "owner": owner},
        {
            "$set": {"state": "active", "consecutive_failures": 0, "updated_at": utcnow()},
            "$unset": {"paused_reason": "", "paused_at": ""},
        },
    )
    if doc is None:
        raise NotFound("No such webhook")
    held = await (
        ctx.store["webhook_deliveries"]
        .find({"webhook_id": str(hook_id), "status": "held"}, {"_id": 1})
        .sort("event_oid", ASCENDING)
        .limit(RESUME_REDELIVER_LIMIT)
        .to_list()
    )
    sent = 0
    for delivery in held:
        again = await _redeliver(ctx, owner, str(hook_id), delivery["_id"], only={"status": "held"})
        sent += again is not None
    return doc, sent


async def note_outcome(ctx: Context, hook: Doc, attempt: Attempt) -> bool:
    """Count an attempt's outcome for the webhook's circuit breaker; ``True`` when this
    failure paused the webhook (``WEBHOOK_BREAKER_FAILURES`` failed attempts in a row)."""
    hooks = ctx.store["webhooks"]
    if attempt.ok:
        if not hook.get("consecutive_failures"):
            # ``hook`` was read just before the attempt: no failure to clear, no write (a
            # failure counted meanwhile by a concurrent attempt is cleared by the next success).
            return False
        await hooks.update_one(
            {"_id": hook["_id"], "consecutive_failures": {"$ne": 0}},
            {"$set": {"consecutive_failures": 0}},
        )
        return False
    counted = await update_then_read(
        hooks,
        {"_id": hook["_id"]},
        {"$inc": {"consecutive_failures": 1}},
        projection={"consecutive_failures": 1, "state": 1},
    )
    if counted is None:
        return False
    failures = int(counted.get("consecutive_failures", 0))
    if failures < ctx.settings.webhook_breaker_failures or counted.get("state") == "paused":
        return False
    now = utcnow()
    reason = f"{failures} consecutive failed deliveries; last: {attempt.error or 'failed'}"
    result = await hooks.update_one(
        {"_id": hook["_id"], "state": {"$ne": "paused"}},
        {
            "$set": {
                "state": "paused",
                "paused_reason": reason[:_REASON_CHARS],
                "paused_at": now,
                "updated_at": now,
            }
        },
    )
    return result.modified_count == 1


def is_paused(hook: Doc) -> bool:
    """Whether the circuit breaker holds the webhook's deliveries."""
    return hook.get("state") == "paused"


def _held_fields(hook: Doc) -> Doc:
    now = utcnow()
    reason = hook.get("paused_reason") or "the webhook is paused"
    return {
        "status": "held",
        "held_at": now,
        "last_error": f"held: the webhook is paused ({reason})"[:500],
        "updated_at": now,
    }


async def hold(ctx: Context, hook: Doc, delivery_id: str, token: str) -> bool:
    """Record a claimed delivery as ``held`` (its webhook is paused) and release the lease;
    nothing is sent. ``False`` when the lease was lost meanwhile."""
    result = await ctx.store["webhook_deliveries"].update_one(
        {"_id": delivery_id, "lease_token": token},
        {"$set": _held_fields(hook), "$unset": _NO_LEASE},
    )
    return result.modified_count == 1


async def hold_new(ctx: Context, hook: Doc, delivery_id: str) -> None:
    """Record a delivery just created for a paused webhook as ``held`` instead of enqueueing
    it (marked enqueued, so a repeated fan-out leaves it alone)."""
    fields = _held_fields(hook)
    await ctx.store["webhook_deliveries"].update_one(
        {"_id": delivery_id, "status": "pending", "enqueued_at": None},
        {"$set": {**fields, "enqueued_at": fields["held_at"]}},
    )


# --- who holds a lease or a slot -----------------------------------------------------------


@dataclass(frozen=True)
class Holder:
    """The worker process attempting a delivery, named in its lease and its slot so that both
    die with it: ``worker_id`` is its registration id, ``beats_key`` the Redis sorted set in
    which every worker's last heartbeat is scored in ms (``workers.registry.registry_index``).
    A worker whose score there is missing or older than ``WORKER_HEARTBEAT_TIMEOUT_MS`` is
    dead."""

    worker_id: str
    beats_key: str


def _beat_cutoff_ms(ctx: Context) -> int:
    """Heartbeats older than this (ms since the epoch) are a dead worker's."""
    return int(time.time() * 1000) - ctx.settings.worker_heartbeat_timeout_ms


async def worker_alive(ctx: Context, beats_key: str, worker_id: str) -> bool:
    """Whether ``worker_id`` beat within ``WORKER_HEARTBEAT_TIMEOUT_MS``; ``True`` when Redis
    cannot tell (a lease is never taken from a worker that may still be attempting)."""
    try:
        score = await ctx.redis.zscore(beats_key, worker_id)
    except (RedisError, OSError):
        return True
    return score is not None and float(score) >= _beat_cutoff_ms(ctx)


# --- the per-user cap on deliveries in flight -----------------------------------------------

# KEYS[1] the user's slot set (member: slot token, score: expiry in ms), KEYS[2] the workers'
# heartbeats; ARGV: now ms, ttl ms, cap, token, heartbeat cutoff ms ('' to skip). Expired slots
# are dropped first; at the cap, so are the slots of workers that stopped beating (a token
# ``<worker id>/<hex>`` names its worker).
_TAKE_SLOT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local cap = tonumber(ARGV[3])
if redis.call('ZCARD', KEYS[1]) >= cap and ARGV[5] ~= '' then
  for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    local worker = string.match(member, '^([^/]+)/')
    if worker then
      local beat = redis.call('ZSCORE', KEYS[2], worker)
      if (not beat) or tonumber(beat) < tonumber(ARGV[5]) then
        redis.call('ZREM', KEYS[1], member)
      end
    end
  end
end
if redis.call('ZCARD', KEYS[1]) >= cap then
  return 0
end
redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


def _slots_key(ctx: Context, owner: str) -> str:
    return ctx.key("webhooks", "in-flight", owner)


def slot_token(holder: Holder | None = None) -> str:
    """A fresh slot token; one of a :class:`Holder` names its worker, so that the slot dies
    with the worker's heartbeat rather than only after its ``ttl``."""
    token = secrets.token_hex(8)
    return f"{holder.worker_id}/{token}" if holder is not None else token


async def take_slot(
    ctx: Context, owner: str, token: str, ttl: timedelta, *, holder: Holder | None = None
) -> bool:
    """Take one of ``owner``'s ``WEBHOOK_MAX_IN_FLIGHT_PER_USER`` delivery slots, held until
    :func:`free_slot` or for ``ttl`` at most; ``False`` when all are taken. With ``holder``,
    slots whose worker (named in their :func:`slot_token`) stopped beating are free again."""
    now_ms = int(time.time() * 1000)
    ttl_ms = max(1, int(ttl.total_seconds() * 1000))
    cap = ctx.settings.webhook_max_in_flight_per_user
    key = _slots_key(ctx, owner)
    beats, cutoff = (holder.beats_key, str(_beat_cutoff_ms(ctx))) if holder else (key, "")
    took = await ctx.redis.eval(_TAKE_SLOT, 2, key, beats, now_ms, ttl_ms, cap, token, cutoff)
    return bool(int(took))


async def free_slot(ctx: Context, owner: str, token: str) -> None:
    """Give a slot back (best effort: it expires by itself)."""
    with contextlib.suppress(RedisError, OSError):
        await ctx.redis.zrem(_slots_key(ctx, owner), token)


async def slots_in_use(ctx: Context, owner: str) -> int:
    """How many of ``owner``'s slots are taken now (expired ones aside)."""
    now_ms = int(time.time() * 1000)
    return int(await ctx.redis.zcount(_slots_key(ctx, owner), now_ms, "+inf"))


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
    # An upsert, not findAndModify (a scan on the test server: core/store.update_then_read);
    # DuplicateKeyError: a concurrent fan-out of the same event inserted it first.
    with contextlib.suppress(DuplicateKeyError):
        result = await coll.update_one({"_id": delivery_id}, {"$setOnInsert": fresh}, upsert=True)
        if result.upserted_id is not None:
            return fresh, True
    doc = await coll.find_one({"_id": delivery_id})
    if doc is None:  # the webhook was deleted meanwhile
        return fresh, False
    return doc, doc.get("enqueued_at") is None


async def mark_enqueued(ctx: Context, delivery_id: str) -> None:
    """Note that the first message of a delivery was sent to the broker."""
    await ctx.store["webhook_deliveries"].update_one(
        {"_id": delivery_id}, {"$set": {"enqueued_at": utcnow()}}
    )


@dataclass(frozen=True)
class Lease:
    """The right to attempt a delivery now: the delivery (as leased), the lease's token, and
    the dead worker (or ``"expired"``) whose interrupted attempt it replaced, if any."""

    delivery: Doc
    token: str
    took_over: str | None = None


async def claim(
    ctx: Context,
    delivery_id: str,
    generation: int,
    lease: timedelta,
    holder: Holder | None = None,
) -> Lease | Literal["busy"] | None:
    """Take the right to attempt a delivery now: a :class:`Lease` for at most ``lease``,
    naming ``holder``'s worker; ``"busy"`` while another message holds a live lease; ``None``
    when there is nothing to do (the delivery is gone, already succeeded, or of another
    generation: a stale message).

    A lease is live until its time runs out or, when it names a worker, until that worker's
    heartbeat is gone (:func:`worker_alive`). A dead lease is taken over (compare-and-set on
    its token, so only one message wins), and its attempt is logged as interrupted: it may
    have reached the receiver. It counts in ``attempts`` but not against the circuit breaker.
    """
    coll = ctx.store["webhook_deliveries"]
    live: Doc = {"_id": delivery_id, "generation": generation, "status": {"$ne": "succeeded"}}
    for _ in range(3):  # a lease given back or taken meanwhile: look again
        now = utcnow()
        token = secrets.token_hex(8)
        fields: Doc = {
            "lease_until": now + lease,
            "lease_token": token,
            "lease_worker": holder.worker_id if holder is not None else None,
            "leased_at": now,
        }
        mine = {"lease_token": token}
        doc = await update_then_read(
            coll, {**live, "lease_token": None}, {"$set": fields}, still=mine
        )
        if doc is not None:
            return Lease(doc, token)
        held = await coll.find_one(live, {f: 1 for f in _LEASE_FIELDS})
        if held is None:
            return None
        if held.get("lease_token") is None:
            continue
        worker = held.get("lease_worker")
        expired = held.get("lease_until") is None or held["lease_until"] < now
        if not expired:
            if worker is None or holder is None:
                return "busy"
            if await worker_alive(ctx, holder.beats_key, str(worker)):
                return "busy"
        gone = "expired" if expired else str(worker)
        reason = "the lease expired" if expired else f"worker {worker} stopped beating"
        doc = await update_then_read(
            coll,
            {**live, "lease_token": held["lease_token"]},
            {
                "$set": {
                    **fields,
                    "last_error": f"interrupted: {reason} during the attempt",
                    "last_attempt_at": held.get("leased_at") or now,
                    "updated_at": now,
                },
                "$inc": {"attempts": 1},
            },
            still=mine,
        )
        if doc is not None:
            return Lease(doc, token, took_over=gone)
    return "busy"


async def release(ctx: Context, delivery_id: str, token: str) -> None:
    """Give a lease back without logging an attempt (the attempt broke off); best effort."""
    with contextlib.suppress(PyMongoError):  # if it fails, the lease runs out by itself
        await ctx.store["webhook_deliveries"].update_one(
            {"_id": delivery_id, "lease_token": token}, {"$unset": _NO_LEASE}
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
        {"$set": fields, "$inc": {"attempts": 1}, "$unset": _NO_LEASE},
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
