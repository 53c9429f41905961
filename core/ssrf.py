"""Webhook targets (SSRF): which URLs, addresses and ports a webhook may be sent to.

The URL syntax rules, the classification of addresses (public or not), the port rule, the allow
list and the resolution of a target's host to the exact addresses a delivery may connect to. It
holds no state and touches no database: :mod:`core.webhooks` checks targets at registration and
the worker (``workers/webhooks.py``) at every delivery.

Addresses. Only ``http``/``https`` URLs without credentials are accepted. The host is resolved
at registration and again at every delivery, and every address it resolves to must be public.
"Public" is decided by an explicit table (:data:`SPECIAL_V4`, :data:`SPECIAL_V6`), taken from the
IANA IPv4 and IPv6 Special-Purpose Address Registries (every block that is not globally
reachable, plus documentation, benchmarking, discard, SRv6 and deprecated relay blocks), not by
the interpreter's ``is_global``, whose answer changes between Python releases. An IPv6 address
must moreover lie in the global unicast space ``2000::/3``; the forms that carry an IPv4 address
(``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``) are judged by that IPv4 address.

Ports. Allowed: 80, 443, and 1024-65535 except the well-known ports of data stores, brokers
and orchestration/admin services in :data:`DENIED_PORTS` (Redis 6379, PostgreSQL 5432, MySQL
3306, MongoDB 27017, memcached 11211, Elasticsearch 9200, AMQP 5672, Docker 2375, ...). Every
other port below 1024 (SSH, SMTP, ...) is refused.

Allow list. A host named in ``WEBHOOK_ALLOW_HOSTS`` skips the address and port rules (e.g.
``127.0.0.1`` in tests): the operator trusts it; nothing else private is ever allowed. The
worker connects to exactly the addresses this check validated (DNS-rebinding safe), and never
follows redirects.

Messages. A refused address says only that the URL is not allowed: never which address or kind
of address a name resolves to (that would make registration a DNS oracle for the internal
network), and a name that does not resolve gets the same message. The reason is logged for
operators by the caller if it wishes (:attr:`TargetRefused.reason`).
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
_FIELD = "url"

#: What a user is told about a host that resolves to a non-public address, or to nothing.
NOT_ALLOWED = "The URL is not allowed: its host must resolve to public addresses only"

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network

#: IPv4 blocks a webhook may never reach (IANA IPv4 Special-Purpose Address Registry, and
#: RFC 5735/6890 relatives), with the name used in logs. 192.0.0.0/24 is refused whole,
#: although two of its /32s (192.0.0.9, 192.0.0.10) are anycast services: no webhook needs them.
SPECIAL_V4: tuple[tuple[ipaddress.IPv4Network, str], ...] = (
    (_V4("0.0.0.0/8"), "this-network"),
    (_V4("10.0.0.0/8"), "private"),
    (_V4("100.64.0.0/10"), "shared (CGNAT)"),
    (_V4("127.0.0.0/8"), "loopback"),
    (_V4("169.254.0.0/16"), "link-local"),
    (_V4("172.16.0.0/12"), "private"),
    (_V4("192.0.0.0/24"), "IETF protocol assignments"),
    (_V4("192.0.2.0/24"), "documentation"),
    (_V4("192.88.99.0/24"), "6to4 relay anycast"),
    (_V4("192.168.0.0/16"), "private"),
    (_V4("198.18.0.0/15"), "benchmarking"),
    (_V4("198.51.100.0/24"), "documentation"),
    (_V4("203.0.113.0/24"), "documentation"),
    (_V4("224.0.0.0/4"), "multicast"),
    (_V4("255.255.255.255/32"), "broadcast"),
    (_V4("240.0.0.0/4"), "reserved"),
)

#: IPv6 blocks a webhook may never reach (IANA IPv6 Special-Purpose Address Registry and the
#: IPv6 Address Space registry). ``::ffff:0:0/96``, ``64:ff9b::/96`` and ``2002::/16`` are not
#: here: they are judged by the IPv4 address they carry. The local-use NAT64 prefix
#: ``64:ff9b:1::/48`` (RFC 8215) is refused whole: it is never globally reachable.
SPECIAL_V6: tuple[tuple[ipaddress.IPv6Network, str], ...] = (
    (_V6("::/128"), "unspecified"),
    (_V6("::1/128"), "loopback"),
    (_V6("::/96"), "IPv4-compatible (deprecated)"),
    (_V6("64:ff9b:1::/48"), "local-use NAT64"),
    (_V6("100::/64"), "discard-only"),
    (_V6("2001::/23"), "IETF protocol assignments (Teredo, ORCHID, ...)"),
    (_V6("2001:db8::/32"), "documentation"),
    (_V6("3fff::/20"), "documentation"),
    (_V6("5f00::/16"), "SRv6 SIDs"),
    (_V6("fc00::/7"), "unique-local"),
    (_V6("fe80::/10"), "link-local"),
    (_V6("fec0::/10"), "site-local (deprecated)"),
    (_V6("ff00::/8"), "multicast"),
)
#: IPv6 global unicast: everything outside it is reserved by the IETF.
_GLOBAL_UNICAST = _V6("2000::/3")
_MAPPED = _V6("::ffff:0:0/96")
_NAT64 = _V6("64:ff9b::/96")
_6TO4 = _V6("2002::/16")

#: Ports of 1024-65535 a webhook may not target: data stores, brokers, caches, search engines,
#: container/orchestration APIs and remote administration, which must never receive an HTTP
#: POST from us. Below 1024 only 80 and 443 are allowed.
DENIED_PORTS: frozenset[int] = frozenset(
    {
        1080,  # SOCKS
        1433,  # SQL Server
        1521,  # Oracle
        2049,  # NFS
        2181,  # ZooKeeper
        2375,  # Docker API
        2376,  # Docker API (TLS)
        2379,  # etcd
        2380,  # etcd peers
        3306,  # MySQL
        3389,  # RDP
        4369,  # Erlang port mapper
        5432,  # PostgreSQL
        5672,  # AMQP (RabbitMQ)
        5900,  # VNC
        5984,  # CouchDB
        6379,  # Redis
        6443,  # Kubernetes API
        8086,  # InfluxDB
        8500,  # Consul
        9042,  # Cassandra
        9092,  # Kafka
        9200,  # Elasticsearch
        9300,  # Elasticsearch transport
        10250,  # kubelet
        11211,  # memcached
        15672,  # RabbitMQ management
        25672,  # RabbitMQ distribution
        26379,  # Redis Sentinel
        27017,  # MongoDB
        27018,  # MongoDB shard
        27019,  # MongoDB config server
    }
)
#: The port rule, as documented to users (README, OpenAPI).
PORT_RULE = (
    "ports 80, 443 and 1024-65535 are allowed, except well-known service ports such as "
    "Redis 6379, PostgreSQL 5432, MySQL 3306, MongoDB 27017, memcached 11211, "
    "Elasticsearch 9200, AMQP 5672 and Docker 2375"
)


class TargetRefused(Invalid):
    """The URL may not be a webhook target (syntax, port, or an address that is not public).

    ``reason`` says why, for operators' logs only: it may name the resolved address.
    """

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message, [FieldError(field=_FIELD, message=message)])
        self.reason = reason or message


class TargetUnresolvable(Invalid):
    """The target's host does not resolve (now): refused at registration, retried at delivery.

    Its message is :data:`NOT_ALLOWED`, the same as a private host's; ``reason`` says more.
    """

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message, [FieldError(field=_FIELD, message=message)])
        self.reason = reason or message


def port_refusal(port: int) -> str | None:
    """Why ``port`` may not be a webhook target's port (``None``: allowed)."""
    if port in (80, 443):
        return None
    if not 1024 <= port <= 65535:
        return f"port {port} is not allowed; {PORT_RULE}"
    if port in DENIED_PORTS:
        return f"port {port} is a well-known service port; {PORT_RULE}"
    return None


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
    """Why ``ip`` may not be a webhook target (``None``: it is a public address), by the
    tables :data:`SPECIAL_V4` and :data:`SPECIAL_V6`."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _MAPPED:
            return refusal(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip in _NAT64:
            return refusal(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip in _6TO4:
            return refusal(ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF))
        for net6, name6 in SPECIAL_V6:
            if ip in net6:
                return name6
        if ip not in _GLOBAL_UNICAST:
            return "reserved"
        return None
    for net4, name4 in SPECIAL_V4:
        if ip in net4:
            return name4
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
    if not allowed and (why := port_refusal(port)) is not None:
        raise TargetRefused(f"The URL is not allowed: {why}")
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
            raise TargetUnresolvable(
                NOT_ALLOWED, f"the host {host} does not resolve ({exc})"
            ) from exc
        if not addresses:
            raise TargetUnresolvable(NOT_ALLOWED, f"the host {host} does not resolve")
    if not allowed:
        for _, address in addresses:
            try:
                reason = refusal(ipaddress.ip_address(address))
            except ValueError:
                reason = "unparsable"
            if reason is not None:
                raise TargetRefused(
                    NOT_ALLOWED, f"the host {host} resolves to a {reason} address ({address})"
                )
    return Target(host=host, port=port, addresses=tuple(addresses), allow_listed=allowed)
