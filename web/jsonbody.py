"""Reading a JSON request body safely, before any model sees it.

Refused, in this order, each as problem+json in the API's own words (never Python's):

- **415** a body without ``Content-Type: application/json`` (a missing header included),
  answered with ``Accept: application/json``;
- **400** a body nested deeper than :data:`MAX_DEPTH` arrays/objects (checked on the raw
  bytes, before parsing, so a 1,000-deep body cannot exhaust the parser's recursion), a body
  that is not UTF-8 or not JSON, ``NaN``/``Infinity`` (not JSON, though Python writes them), and
  an object with the same key twice (which of the two would count is undefined, RFC 8259 §4).

The body is then validated by the route's model (422 for its rules).
"""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

from core.errors import BadRequest, UnsupportedMediaType

#: The deepest nesting of arrays and objects a body may have; ours need 3 at most.
MAX_DEPTH = 64

JSON_TYPE = "application/json"

#: A JSON string literal (escapes included); what is inside does not count as nesting.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_OPEN = frozenset(b"[{")


class _Refused(ValueError):
    """A body json.loads would accept but we do not."""


async def read_json(request: web.Request) -> bytes:
    """The raw body of a JSON request, checked as the module docstring says."""
    if request.content_type != JSON_TYPE:
        sent = request.headers.get("Content-Type")
        detail = (
            f"Send the body as {JSON_TYPE} (Content-Type was {sent!r})"
            if sent
            else f"Send the body with 'Content-Type: {JSON_TYPE}'"
        )
        raise UnsupportedMediaType(detail, headers={"Accept": JSON_TYPE})
    raw = await request.read()
    check_json(raw)
    return raw


def check_json(raw: bytes) -> Any:
    """Parse ``raw`` with the refusals above; returns the value (raises :class:`BadRequest`)."""
    if too_deep(raw):
        raise BadRequest(f"The body nests arrays and objects deeper than {MAX_DEPTH} levels")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest("The body is not valid UTF-8") from exc
    try:
        return json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except _Refused as exc:
        raise BadRequest(str(exc)) from exc
    except json.JSONDecodeError as exc:
        raise BadRequest(
            f"The body is not valid JSON (line {exc.lineno}, column {exc.colno})"
        ) from exc
    except (ValueError, RecursionError) as exc:  # e.g. an integer of thousands of digits
        raise BadRequest("The body is not valid JSON") from exc


def too_deep(raw: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether ``raw`` nests ``[``/``{`` more than ``limit`` deep, strings left out.

    Linear and cheap: strings are cut out by one regular expression, everything but brackets by
    ``bytes.translate``; only a body with more than ``limit`` opening brackets is walked, and
    the walk stops at the first level past the limit.
    """
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    if brackets.count(b"[") + brackets.count(b"{") <= limit:
        return False
    depth = 0
    for byte in brackets:
        if byte in _OPEN:
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _refuse_constant(name: str) -> Any:
    raise _Refused(f"The body is not valid JSON: {name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"The body is not valid JSON: the key {key[:64]!r} appears twice")
        out[key] = value
    return out
