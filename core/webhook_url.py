"""The syntax of a webhook URL as one regular expression, for the OpenAPI document.

:func:`core.ssrf.check_url` is what the server enforces; :data:`URL_PATTERN` says the same in
JSON Schema (ECMA-262) terms, so a schema-driven client never sends a URL the syntax check
refuses, and the check refuses what breaks the pattern (tests/core/test_webhook_url.py holds
both directions). What a pattern cannot say is checked at registration all the same: the
host must resolve to public addresses (unless allow-listed) and the port must be allowed.

An ``http``/``https`` URL (scheme in any case), no credentials, a host that is a name of
labels ``[A-Za-z0-9_-]`` (1-63 characters, no hyphen at either end; the last label not all
digits nor ``0x``-prefixed), a dotted IPv4 address or a bracketed IPv6 address, then an
optional port 1-65535, then an optional path and query of printable ASCII without ``#``.
"""

from __future__ import annotations

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_H16 = r"[0-9A-Fa-f]{1,4}"
_LS32 = rf"(?:{_H16}:{_H16}|{_IPV4})"
#: RFC 3986's IPv6address.
_IPV6 = (
    "(?:"
    rf"(?:{_H16}:){{6}}{_LS32}"
    rf"|::(?:{_H16}:){{5}}{_LS32}"
    rf"|(?:{_H16})?::(?:{_H16}:){{4}}{_LS32}"
    rf"|(?:(?:{_H16}:){{0,1}}{_H16})?::(?:{_H16}:){{3}}{_LS32}"
    rf"|(?:(?:{_H16}:){{0,2}}{_H16})?::(?:{_H16}:){{2}}{_LS32}"
    rf"|(?:(?:{_H16}:){{0,3}}{_H16})?::{_H16}:{_LS32}"
    rf"|(?:(?:{_H16}:){{0,4}}{_H16})?::{_LS32}"
    rf"|(?:(?:{_H16}:){{0,5}}{_H16})?::{_H16}"
    rf"|(?:(?:{_H16}:){{0,6}}{_H16})?::"
    ")"
)
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
#: The last label: not all digits (that is an IPv4 address or nothing), not ``0x...``.
_LAST = rf"(?![0-9]+\.*(?:[:/?#]|$))(?!0[xX]){_LABEL}"
_PORT = r"(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"

URL_PATTERN = (
    rf"^[Hh][Tt][Tt][Pp][Ss]?://(?:(?:(?:{_LABEL}\.)*{_LAST}|{_IPV4})\.*|\[{_IPV6}\])"
    rf"(?::(?:0*{_PORT})?)?(?:[/?][!-\"$-~]*)?#?$"
)
