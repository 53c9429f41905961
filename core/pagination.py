"""Opaque keyset cursors: ``(sort field value, _id)`` of the last item, signed so a client can
neither forge one nor replay it against another sort.

On the wire a cursor is unpadded base64url (:data:`CURSOR_PATTERN`, at most
:data:`MAX_CURSOR` characters): the ``next_cursor`` of the previous page of the same list
(same filters and sort); empty (or left out) asks for the first page. Any other value is
refused (422) -- the document says so, and its OpenAPI links hand ``next_cursor`` on to the
next request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime
from typing import Annotated, Any

from bson import ObjectId
from bson.errors import InvalidId
from pydantic import Field, StringConstraints

from core.errors import FieldError, Invalid

MAX_CURSOR = 512
#: What every cursor of the API looks like (base64url without padding; empty: first page).
CURSOR_PATTERN = "^[A-Za-z0-9_-]*$"
#: A list's ``cursor`` query parameter. The pattern is documented, not checked here: a value
#: that breaks it cannot be a cursor we made, and is refused like any other forged one.
Cursor = Annotated[
    str,
    StringConstraints(max_length=MAX_CURSOR),
    Field(
        description="The next_cursor of the previous page of this list (same filters and "
        "sort), as it was given; empty or left out: the first page. Opaque and signed: any "
        "other value is refused (422)",
        json_schema_extra={"pattern": CURSOR_PATTERN},
    ),
]

_BAD = Invalid("The cursor is not valid", [FieldError("cursor", "Invalid or expired cursor")])


def _encode_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"d": int(value.timestamp() * 1000)}
    return value


def _decode_value(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"d"} and isinstance(value["d"], int):
        return datetime.fromtimestamp(value["d"] / 1000, UTC)
    if isinstance(value, (int, str)) or value is None:
        return value
    raise _BAD


def encode_cursor(secret: bytes, sort: str, value: Any, last_id: ObjectId) -> str:
    """A cursor pointing after the item with sort key ``value`` and id ``last_id``."""
    raw = json.dumps([sort, _encode_value(value), str(last_id)], separators=(",", ":")).encode()
    mac = hmac.new(secret, raw, hashlib.sha256).digest()[:12]
    return base64.urlsafe_b64encode(mac + raw).rstrip(b"=").decode()


def decode_cursor(secret: bytes, sort: str, cursor: str) -> tuple[Any, ObjectId]:
    """The ``(value, id)`` a cursor points after; :class:`Invalid` if forged or for another sort."""
    try:
        blob = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        mac, raw = blob[:12], blob[12:]
        if not hmac.compare_digest(mac, hmac.new(secret, raw, hashlib.sha256).digest()[:12]):
            raise _BAD
        cursor_sort, value, last_id = json.loads(raw)
        if cursor_sort != sort:
            raise _BAD
        return _decode_value(value), ObjectId(last_id)
    except (ValueError, TypeError, InvalidId) as exc:
        raise _BAD from exc


def after(field: str, value: Any, last_id: ObjectId, descending: bool) -> dict[str, Any]:
    """The MongoDB filter for items strictly after ``(value, last_id)`` in the sort order."""
    op = "$lt" if descending else "$gt"
    return {"$or": [{field: {op: value}}, {field: value, "_id": {op: last_id}}]}
