"""Webhook targets (SSRF): which URLs and addresses a webhook may be sent to.

The URL syntax rules, the classification of addresses (public or not), the allow list and the
resolution of a target's host to the exact addresses a delivery may connect to. It holds no
state and touches no database: :mod:`core.webhooks` checks targets at registration and the worker
(``workers/webhooks.py``) at every delivery.

Targets (SSRF). Only ``http``/``https`` URLs without credentials are accepted. The host is
resolved at registration and again at every delivery, and every address it resolves to must be
publicly routable: private, loopback, link-local, multicast, reserved, unspecified, shared
(CGNAT) and site-local addresses are refused, including IPv4 addresses wrapped in IPv6
(``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``). A host named in
``WEBHOOK_ALLOW_HOSTS`` skips the address rule (e.g. ``127.0.0.1`` in tests); nothing else
private is ever allowed. The worker connects to exactly the addresses this check validated
(DNS-rebinding safe), and never follows redirects.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from core.errors import FieldError, Invalid

MAX_URL_LENGTH = 2048
#: How long the DNS lookup of a target may take.
RESOLVE_TIMEOUT = 5.0
Address = tuple[int, str]
#: ``resolve(host, port)`` → ``[(family, ip), ...]``; injectable for tests.
Resolver = Callable[[str, int], Awaitable[list[Address]]]

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_FIELD = "url"


class TargetRefused(Invalid):
    """The URL may not be a webhook target (scheme, or an address that is not public)."""

    def __init__(self, message: str):
        super().__init__(message, [FieldError(field=_FIELD, message=message)])


class TargetUnresolvable(Invalid):
    """The target's host does not resolve (now): refused at registration, retried at delivery."""

    def __init__(self, message: str):
        super().__init__(message, [FieldError(field=_FIELD, message=message)])


def check_url(url: str) -> str:
    """Syntax rules of a webhook URL (the address rules need DNS: :func:`check_target`)."""
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"must be at most {MAX_URL_LENGTH} characters")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise ValueError("must not contain whitespace or control characters")
    if not url.isascii():
        raise ValueError(
            "must be ASCII: use the xn-- form of international host names and percent-encoding"
        )
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError("only http and https URLs are allowed")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not contain credentials")
    if parts.fragment:
        raise ValueError("must not contain a fragment")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError("has an invalid port") from exc
    if port == 0:
        raise ValueError("has an invalid port")
    host = parts.hostname
    if not host:
        raise ValueError("needs a host")
    if parts.netloc.rsplit("@", 1)[-1].startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise ValueError("has an invalid IPv6 address") from exc
        return url
    labels = host.rstrip(".").split(".")
    if not all(_LABEL.match(label) for label in labels):
        raise ValueError("has an invalid host name")
    # A numeric last label is only valid as a dotted IPv4 address; other numeric spellings
    # (``2130706433``, ``0x7f.1``, ``127.1``) are refused rather than left to the resolver.
    if labels[-1].isdigit() or labels[-1].lower().startswith("0x"):
        try:
            ipaddress.IPv4Address(host.rstrip("."))
        except ValueError as exc:
            raise ValueError("IPv4 addresses must be written as four decimal numbers") from exc
    return url


IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def refusal(ip: IP) -> str | None:
    """Why ``ip`` may not be a webhook target (``None``: it is a public address)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return refusal(ip.ipv4_mapped)
        if ip in _NAT64:
            return refusal(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.sixtofour is not None and (reason := refusal(ip.sixtofour)) is not None:
            return reason
        if ip.teredo is not None and (reason := refusal(ip.teredo[1])) is not None:
            return reason
    checks: tuple[tuple[bool, str], ...] = (
        (ip.is_unspecified, "unspecified"),
        (ip.is_loopback, "loopback"),
        (ip.is_link_local, "link-local"),
        (ip.is_multicast, "multicast"),
        (ip.is_private, "private"),
        (ip.is_reserved, "reserved"),
        (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local, "site-local"),
        (not ip.is_global, "non-public"),
    )
    for bad, reason in checks:
        if bad:
            return reason
    return None


def _normal_host(host: str) -> str:
    host = host.strip().strip("[]").rstrip(".").lower()
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def is_allow_listed(host: str, allow_hosts: list[str]) -> bool:
    """Whether ``host`` is named in ``WEBHOOK_ALLOW_HOSTS`` (case, brackets and IP spelling
    do not matter)."""
    return _normal_host(host) in {_normal_host(h) for h in allow_hosts}


async def system_resolve(host: str, port: int) -> list[Address]:
    """Resolve ``host`` with the system resolver (in the loop's executor)."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return list(
        dict.fromkeys((int(family), str(sockaddr[0])) for family, _, _, _, sockaddr in infos)
    )


@dataclass(frozen=True)
class Target:
    """A checked target: connect only to ``addresses`` (what the check validated)."""

    host: str
    port: int
    addresses: tuple[Address, ...]
    allow_listed: bool


async def check_target(
    url: str,
    allow_hosts: list[str],
    *,
    resolve: Resolver = system_resolve,
    resolve_timeout: float = RESOLVE_TIMEOUT,
) -> Target:
    """Resolve ``url``'s host once and check every address it resolves to.

    Raises :class:`TargetRefused` (bad URL, or a non-public address of a host that is not
    allow-listed) or :class:`TargetUnresolvable` (no address, or the lookup failed).
    """
    try:
        check_url(url)
    except ValueError as exc:
        raise TargetRefused(f"The URL is not allowed: it {exc}") from exc
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    allowed = is_allow_listed(host, allow_hosts)
    try:
        literal: IP | None = ipaddress.ip_address(host.rstrip("."))
    except ValueError:
        literal = None
    if literal is not None:
        family = socket.AF_INET6 if literal.version == 6 else socket.AF_INET
        addresses = [(int(family), str(literal))]
    else:
        try:
            addresses = await asyncio.wait_for(resolve(host, port), resolve_timeout)
        except (OSError, TimeoutError, UnicodeError) as exc:
            raise TargetUnresolvable(f"The host {host} does not resolve ({exc})") from exc
        if not addresses:
            raise TargetUnresolvable(f"The host {host} does not resolve")
    if not allowed:
        for _, address in addresses:
            try:
                reason = refusal(ipaddress.ip_address(address))
            except ValueError:
                reason = "unparsable"
            if reason is not None:
                raise TargetRefused(
                    f"The host {host} resolves to a {reason} address ({address}); webhooks "
                    "may only target public addresses"
                )
    return Target(host=host, port=port, addresses=tuple(addresses), allow_listed=allowed)
