"""Opaque keyset cursors: ``(sort field value, _id)`` of the last item, signed so a client can
neither forge one nor replay it against another sort."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime
from typing import Any

from bson import ObjectId
from bson.errors import InvalidId

from core.errors import FieldError, Invalid

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
