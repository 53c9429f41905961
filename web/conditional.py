"""Conditional request headers (RFC 9110 section 13): ``If-Match`` and ``If-None-Match``.

Both are ``*`` or a comma-separated list of entity tags (``"opaque"`` or weak ``W/"opaque"``);
empty list elements are skipped, at least one tag is needed. A value that is neither is
malformed: 400, never 412 (which would tell the client "the resource changed" when it did
not). The OpenAPI document states the same grammar as :data:`PRECONDITION_PATTERN`, so a
schema-driven client never sends a value the server refuses.

``If-Match`` uses the strong comparison (a weak tag never matches), ``If-None-Match`` the weak
one (``W/`` is ignored).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aiohttp import web

from core.errors import BadRequest

#: etagc of RFC 9110 without obs-text: printable ASCII except the double quote.
_TAG = r'(?:W/)?"[!#-~]*"'
#: ``*``, or a list of entity tags with optional whitespace and empty elements.
PRECONDITION_PATTERN = rf"^[\t ]*(?:\*|(?:,[\t ]*)*{_TAG}(?:[\t ]*,(?:[\t ]*{_TAG})?)*)[\t ]*$"
_VALID = re.compile(PRECONDITION_PATTERN)
_ONE_TAG = re.compile(_TAG)


@dataclass(frozen=True)
class Precondition:
    """A parsed ``If-Match`` / ``If-None-Match`` value."""

    any: bool
    #: The entity tags as sent, ``W/`` included.
    tags: tuple[str, ...]

    def weak_match(self, etag: str) -> bool:
        """``If-None-Match``: ``*`` or a tag equal to ``etag`` once ``W/`` is ignored."""
        return self.any or etag.removeprefix("W/") in [t.removeprefix("W/") for t in self.tags]


def precondition(request: web.Request, name: str) -> Precondition | None:
    """The parsed header ``name`` (``None`` when absent); :class:`BadRequest` when malformed."""
    if name not in request.headers:
        return None
    values = request.headers.getall(name)
    value = ", ".join(values)
    if len(values) > 1 and any(v.strip() == "*" for v in values):
        value = "!"  # "*" may not be combined with tags: malformed
    if not _VALID.fullmatch(value):
        raise BadRequest(
            f"{name} must be * or a comma-separated list of entity tags such as "
            '"6650f0c2a1b2c3d4e5f60718.3" (quotes included)'
        )
    if value.strip() == "*":
        return Precondition(any=True, tags=())
    return Precondition(any=False, tags=tuple(_ONE_TAG.findall(value)))
