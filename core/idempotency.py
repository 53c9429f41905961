"""Idempotency keys: a POST repeated with the same ``Idempotency-Key`` gets the first response.

Records live in MongoDB (collection ``idempotency``, reaped 24 h after ``expires_at``), one per
(caller, key), ``_id = "<scope>:<sha256(key)>"``; the scope is the caller (``user:<id>``, or
``anon:<address>`` on anonymous routes). Per request carrying a key:

1. **Claim** by inserting ``{state: "in_progress", owner, lease_until, fingerprint,
   expires_at}``: the unique ``_id`` lets one of concurrent repeats win.
2. A loser or a later repeat compares request fingerprints: another request under the same key
   is refused (422). The same request: ``done`` → the stored response is replayed;
   ``in_progress`` → 409 with ``Retry-After``, unless the claim's lease ran out (its process
   died), in which case the newcomer takes the claim over (compare-and-set on ``owner``).
3. The winner runs the handler, then **completes** the record with the response (status,
   selected headers, body), or **releases** it (deletes it) after a 5xx, a 429 or an exception,
   so the client can retry. Other 4xx answers are stored and replayed.

Stored bodies are encrypted (AES-256-GCM) under a key derived from ``JWT_SECRET`` and the
idempotency key, bound to the record's ``_id``; fingerprints are HMACs.

Known limit: the handler's write and the completion are not one transaction. If a process dies
between them, the lease runs out and a repeat runs the handler again (register then answers 409
"email exists"; another create could make a second object).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

from bson import Binary
from pymongo.errors import DuplicateKeyError, PyMongoError

from config.logging import get_logger
from core.context import Context
from core.errors import Conflict, FieldError, Invalid
from core.security import Unsealable, derive_key, seal, unseal
from core.store import Doc, utcnow

log = get_logger(__name__)

COLLECTION = "idempotency"
#: How long a key is remembered (API.md: "keys live 24 h").
TTL = timedelta(hours=24)
#: How long an in-progress claim blocks repeats before another request may take it over.
LEASE = timedelta(seconds=60)
#: The header's name, also the field named in validation errors.
FIELD = "header.Idempotency-Key"

_KEY_RE = re.compile(r"[\x20-\x7e]{1,255}")
_CLAIM_ATTEMPTS = 5


@dataclass(frozen=True)
class StoredResponse:
    """A response as recorded for replay: status, selected headers, body bytes."""

    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Claim:
    """Proof that this request owns a key: only the owner may complete or release it."""

    id: str
    key: str
    owner: str


@dataclass(frozen=True)
class Outcome:
    """What :func:`run` answers with: the response and whether it is a replay."""

    response: StoredResponse
    replayed: bool


def check_key(value: str) -> str:
    """The key if it is 1 to 255 printable ASCII characters, else :class:`Invalid` (422)."""
    if not _KEY_RE.fullmatch(value):
        raise Invalid(
            "Idempotency-Key must be 1-255 printable ASCII characters",
            [FieldError(field=FIELD, message="Expected 1-255 printable ASCII characters")],
        )
    return value


def fingerprint(ctx: Context, method: str, path: str, body: bytes) -> str:
    """Identify a request so a key reused for a different one is caught.

    JSON bodies are canonicalised (sorted keys, no whitespace), so a client that re-serialises
    the same object differently is still recognised as repeating itself.
    """
    try:
        canonical = json.dumps(
            json.loads(body), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()
    except (ValueError, UnicodeDecodeError):
        canonical = body
    message = b"\n".join([method.upper().encode(), path.encode(), canonical])
    return hmac.new(_derived(ctx, "fingerprint"), message, hashlib.sha256).hexdigest()


def record_id(scope: str, key: str) -> str:
    """The ``_id`` of a key's record (see the module docstring for why the key is digested)."""
    return f"{scope}:{hashlib.sha256(key.encode()).hexdigest()}"


def keeps(status: int) -> bool:
    """Whether a response with this status is stored for replay (else the claim is released)."""
    return status < 500 and status != 429


async def claim(
    ctx: Context,
    scope: str,
    key: str,
    fingerprint: str,
    *,
    lease: timedelta = LEASE,
    ttl: timedelta = TTL,
) -> Claim | StoredResponse:
    """Claim ``key`` for this request, or return the stored response to replay.

    Raises :class:`Invalid` when the key was used for a different request and
    :class:`Conflict` (with ``Retry-After``) while the first request is still running.
    """
    rid = record_id(scope, key)
    records = ctx.store[COLLECTION]
    for _ in range(_CLAIM_ATTEMPTS):
        now = utcnow()
        owner = secrets.token_urlsafe(16)
        fresh: Doc = {
            "state": "in_progress",
            "owner": owner,
            "fingerprint": fingerprint,
            "created_at": now,
            "lease_until": now + lease,
            "expires_at": now + ttl,
        }
        try:
            await records.insert_one({"_id": rid, **fresh})
            return Claim(rid, key, owner)
        except DuplicateKeyError:
            pass
        existing = await records.find_one({"_id": rid})
        if existing is None:  # released or reaped since our insert failed: try again
            continue
        # The TTL monitor runs about once a minute; a record past its 24 h is already gone.
        expired = existing["expires_at"] <= now
        if not expired and existing["fingerprint"] != fingerprint:
            raise Invalid(
                "This Idempotency-Key was already used with a different request",
                [FieldError(field=FIELD, message="Already used with a different request")],
            )
        if not expired and existing["state"] == "done":
            return _decode(ctx, existing, key)
        if not expired and existing["lease_until"] > now:
            raise Conflict(
                "A request with this Idempotency-Key is still being processed",
                headers={"Retry-After": "1"},
            )
        # Expired, or its owner's lease ran out (a crashed process): take it over, unless
        # another request beat us to it, in which case look again.
        taken = await records.replace_one({"_id": rid, "owner": existing["owner"]}, fresh)
        if taken.matched_count == 1:
            log.warning("idempotency.taken_over", record=rid, was=existing["state"])
            return Claim(rid, key, owner)
    raise Conflict(
        "A request with this Idempotency-Key is still being processed",
        headers={"Retry-After": "1"},
    )


async def complete(ctx: Context, claim: Claim, response: StoredResponse) -> bool:
    """Store the response of a claimed request; ``False`` if the claim was lost meanwhile."""
    sealed = seal(_record_key(ctx, claim.key), response.body, claim.id)
    result = await ctx.store[COLLECTION].update_one(
        {"_id": claim.id, "owner": claim.owner, "state": "in_progress"},
        {
            "$set": {
                "state": "done",
                "status": response.status,
                "headers": response.headers,
                "body": Binary(sealed),
                "completed_at": utcnow(),
            },
            "$unset": {"lease_until": ""},
        },
    )
    if result.matched_count != 1:
        log.warning("idempotency.claim_lost", record=claim.id)
        return False
    return True


async def release(ctx: Context, claim: Claim) -> bool:
    """Forget a claimed key so the client may retry; ``False`` if the claim was lost meanwhile."""
    result = await ctx.store[COLLECTION].delete_one(
        {"_id": claim.id, "owner": claim.owner, "state": "in_progress"}
    )
    return result.deleted_count == 1


async def run(
    ctx: Context,
    scope: str,
    key: str,
    fingerprint: str,
    call: Callable[[], Awaitable[StoredResponse]],
    *,
    lease: timedelta = LEASE,
    ttl: timedelta = TTL,
) -> Outcome:
    """Run ``call`` at most once per (scope, key): claim, call, then store or release.

    A replay does not call ``call``. When ``call`` raises (including cancellation) or answers
    with a status that :func:`keeps` refuses, the claim is released and the client may retry.
    """
    got = await claim(ctx, scope, key, fingerprint, lease=lease, ttl=ttl)
    if isinstance(got, StoredResponse):
        return Outcome(got, replayed=True)
    try:
        response = await call()
    except BaseException:
        await _release_quietly(ctx, got)
        raise
    try:
        if keeps(response.status):
            await complete(ctx, got, response)
        else:
            await release(ctx, got)
    except PyMongoError:
        # The work is done and the client should learn its result; the record stays
        # in progress until its lease runs out (see "Known limit" above).
        log.exception("idempotency.record_failed", record=got.id)
    return Outcome(response, replayed=False)


async def _release_quietly(ctx: Context, claim: Claim) -> None:
    try:
        await release(ctx, claim)
    except PyMongoError:
        log.exception("idempotency.release_failed", record=claim.id)


def _decode(ctx: Context, doc: Doc, key: str) -> StoredResponse:
    try:
        body = unseal(_record_key(ctx, key), doc["body"], doc["_id"])
    except Unsealable as exc:
        # Only after JWT_SECRET was rotated: the first response can no longer be reproduced.
        raise Conflict(
            "The first response to this Idempotency-Key can no longer be replayed; "
            "send the request with a new key"
        ) from exc
    return StoredResponse(status=doc["status"], headers=dict(doc["headers"]), body=body)


def _derived(ctx: Context, purpose: str) -> bytes:
    return derive_key(ctx.settings, "idempotency/" + purpose)


def _record_key(ctx: Context, key: str) -> bytes:
    return hmac.new(_derived(ctx, "response"), key.encode(), hashlib.sha256).digest()
