"""Events: what happened to a domain object. One collection is both the activity log and the
outbox: an event is written in the same transaction as its change with ``pending: True``; the
relay hands it to the broker and clears ``pending``. A crash or a Redis outage between write
and enqueue therefore delays side effects but never drops them.
"""

from __future__ import annotations

from typing import Any

from bson import ObjectId
from pymongo.asynchronous.client_session import AsyncClientSession
from structlog.contextvars import get_contextvars

from core.store import Doc, Store, utcnow


def new_event(
    type_: str,
    *,
    user_id: str,
    actor_id: str | None = None,
    subject_id: str | None = None,
    data: dict[str, Any] | None = None,
) -> Doc:
    """Build an event document (not yet stored); carries the current request id."""
    return {
        "_id": ObjectId(),
        "type": type_,
        "user_id": user_id,
        "actor_id": actor_id or user_id,
        "subject_id": subject_id,
        "data": data or {},
        "created_at": utcnow(),
        "request_id": get_contextvars().get("request_id"),
        "pending": True,
    }


async def record(store: Store, events: list[Doc], session: AsyncClientSession | None) -> None:
    """Store events (inside the caller's transaction when ``session`` is given)."""
    if events:
        await store["events"].insert_many(events, session=session)


def public_event(event: Doc) -> dict[str, Any]:
    """The JSON shape of an event sent to actors and shown in activity lists."""
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
