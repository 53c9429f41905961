"""Issue 7, SSRF guard: special-purpose ranges the interpreter's ``is_global`` let through,
any port on a public host, and a refusal that told which address a name resolved to.

Nothing here sends a packet: addresses are literals and resolvers are stand-ins, and the one
registration through the API targets a literal address the check refuses before any
connection.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import pytest

from core import ssrf
from core.ssrf import TargetRefused, TargetUnresolvable, check_target, port_refusal, refusal
from tests.conftest import bearer, register

V4, V6 = int(socket.AF_INET), int(socket.AF_INET6)

#: One address inside every range the guard must refuse (first the three that passed before).
REFUSED = [
    "192.0.0.8",  # 192.0.0.0/24 IETF protocol assignments (passed before)
    "192.88.99.1",  # 192.88.99.0/24 6to4 relay anycast (passed before)
    "3fff::1",  # 3fff::/20 documentation (passed before)
    "3fff:fff::1",
    "0.1.2.3",  # 0.0.0.0/8
    "10.20.30.40",
    "100.64.0.1",
    "100.127.255.254",
    "127.0.0.2",
    "169.254.169.254",
    "172.16.0.1",
    "172.31.255.255",
    "192.0.2.77",
    "192.168.7.7",
    "198.18.0.1",
    "198.19.255.255",
    "198.51.100.3",
    "203.0.113.9",
    "224.0.0.251",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
    "::",
    "::1",
    "::ffff:127.0.0.1",  # IPv4-mapped: judged by the mapped address
    "::ffff:192.88.99.1",
    "::ffff:10.0.0.1",
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "64:ff9b::c058:6301",  # NAT64 of 192.88.99.1
    "64:ff9b:1::808:808",  # local-use NAT64 (RFC 8215): refused whole
    "100::1",
    "2001::1",  # Teredo, in 2001::/23
    "2001:2::1",
    "2001:db8::1",
    "2002:c000:0208::1",  # 6to4 of 192.0.2.8
    "2002:a00:1::1",  # 6to4 of 10.0.0.1
    "5f00::1",
    "fc00::1",
    "fd12:3456::1",
    "fe80::1",
    "fec0::1",
    "ff02::1",
    "::1.2.3.4",  # IPv4-compatible (deprecated)
    "4000::1",  # outside global unicast 2000::/3
]

PUBLIC = ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8"]


@pytest.mark.parametrize("address", REFUSED)
def test_special_purpose_addresses_are_refused(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize(
    "address", [*PUBLIC, "64:ff9b::808:808", "2002:808:808::1", "192.0.1.1", "192.88.98.1"]
)
def test_public_addresses_pass(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is None


def test_table_names_every_range_of_the_issue() -> None:
    """The table is explicit, not the interpreter's ``is_global``."""
    v4 = {str(net) for net, _ in ssrf.SPECIAL_V4}
    v6 = {str(net) for net, _ in ssrf.SPECIAL_V6}
    assert {
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "255.255.255.255/32",
    } <= v4
    assert {
        "::/128",
        "::1/128",
        "64:ff9b:1::/48",
        "100::/64",
        "2001::/23",
        "2001:db8::/32",
        "3fff::/20",
        "5f00::/16",
        "fc00::/7",
        "fe80::/10",
        "ff00::/8",
    } <= v6


@pytest.mark.parametrize("port", [22, 25, 6379, 5432, 3306, 27017, 11211, 9200, 5672, 2375, 1023])
def test_service_ports_are_refused(port: int) -> None:
    assert port_refusal(port) is not None


@pytest.mark.parametrize("port", [80, 443, 8080, 8443, 1024, 3000, 65535])
def test_web_ports_pass(port: int) -> None:
    assert port_refusal(port) is None


async def fails_if_called(host: str, port: int) -> list[tuple[int, str]]:
    raise AssertionError(f"resolved {host}: the port rule must refuse before any lookup")


async def test_public_host_on_port_6379_is_refused() -> None:
    """Before: ``http://<public>:6379/`` passed, so our workers could POST into anyone's Redis."""
    for url in ("http://93.184.216.34:6379/", "http://hooks.example.com:6379/x"):
        with pytest.raises(TargetRefused, match="port 6379"):
            await check_target(url, [], resolve=fails_if_called)
    with pytest.raises(TargetRefused, match="port 22 is not allowed"):
        await check_target("https://[2606:4700::1111]:22/", [], resolve=fails_if_called)
    ok = await check_target("https://93.184.216.34:8443/in", [], resolve=fails_if_called)
    assert ok.port == 8443


async def test_refusal_does_not_reveal_the_resolved_address() -> None:
    """Before: "The host h resolves to a private address (10.1.2.3)" — a DNS oracle."""
    table = {
        "db.internal.example": ["10.1.2.3"],
        "mixed.example.com": ["93.184.216.34", "fd00::53"],
        "relay.example.com": ["192.88.99.7"],
    }

    async def resolve(host: str, port: int) -> list[tuple[int, str]]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(V6 if ":" in ip else V4, ip) for ip in table[host]]

    messages = set()
    for host, addresses in table.items():
        with pytest.raises(TargetRefused) as refused:
            await check_target(f"https://{host}/hook", [], resolve=resolve)
        message = str(refused.value)
        assert "not allowed" in message
        for address in addresses:
            assert address not in message
            assert address not in str(refused.value.errors)
        for word in ("private", "loopback", "unique-local", "relay", "resolves to"):
            assert word not in message
        messages.add(message)
    # A name that does not exist gets the very same answer as one that resolves privately.
    with pytest.raises(TargetUnresolvable) as unresolvable:
        await check_target("https://nothing.example.com/hook", [], resolve=resolve)
    messages.add(str(unresolvable.value))
    assert messages == {ssrf.NOT_ALLOWED}


async def test_api_answer_is_only_not_allowed(make_settings: Any, aiohttp_client: Any) -> None:
    """Through the API: 422 on ``url`` saying "not allowed", naming no address or range kind."""
    from web.app import create_app

    client = await aiohttp_client(create_app(make_settings()))
    auth = bearer((await register(client))["access_token"])
    for url in ("http://localhost:8080/hook", "http://192.0.0.8/", "http://[3fff::1]/"):
        resp = await client.post(
            "/api/v1/webhooks", json={"url": url, "events": ["*"]}, headers=auth
        )
        assert resp.status == 422, await resp.text()
        text = await resp.text()
        assert "not allowed" in text
        for leak in ("127.0.0.1", "::1", "loopback", "resolves"):
            assert leak not in text, (url, text)


async def test_allow_listed_host_still_passes() -> None:
    """``WEBHOOK_ALLOW_HOSTS`` (loopback in tests) skips the address and port rules."""
    target = await check_target("http://127.0.0.1:9/x", ["127.0.0.1"], resolve=fails_if_called)
    assert target.allow_listed
    with pytest.raises(TargetRefused):
        await check_target("http://127.0.0.1:9/x", [], resolve=fails_if_called)
