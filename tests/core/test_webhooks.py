"""Pure parts of webhooks: URL rules, address classification, target checks, signing,
secret sealing. No network: resolvers are stand-ins, addresses are literals."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
from typing import Any

import pytest
from pydantic import ValidationError

from config.settings import Settings
from core import ssrf, webhooks
from core.ssrf import TargetRefused, TargetUnresolvable
from tests.conftest import TEST_SECRET

V4, V6 = int(socket.AF_INET), int(socket.AF_INET6)


def fake_resolver(table: dict[str, list[str]]) -> Any:
    calls: list[str] = []

    async def resolve(host: str, port: int) -> list[tuple[int, str]]:
        calls.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(V6 if ":" in ip else V4, ip) for ip in table[host]]

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("224.0.0.1", "multicast"),
        ("233.252.0.1", "multicast"),
        ("0.0.0.0", "this-network"),
        ("100.64.0.1", "shared (CGNAT)"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "broadcast"),
        ("192.0.2.1", "documentation"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fc00::1", "unique-local"),
        ("ff02::1", "multicast"),
        ("fec0::1", "site-local (deprecated)"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.1.2.3", "private"),
        ("64:ff9b::a9fe:a9fe", "link-local"),
        ("2002:7f00:1::", "loopback"),
        ("2001:db8::1", "documentation"),
    ],
)
def test_non_public_addresses_are_refused(address: str, reason: str) -> None:
    assert ssrf.refusal(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize(
    "address", ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]
)
def test_public_addresses_pass(address: str) -> None:
    assert ssrf.refusal(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/x",
        "file:///etc/passwd",
        "gopher://example.com",
        "javascript:alert(1)",
        "http://user:pw@example.com/",
        "http://example.com/a b",
        "http://example.com/\n",
        "http://exämple.com/",
        "http:///nohost",
        "http://example.com:0/",
        "http://example.com:99999/",
        "http://2130706433/",
        "http://0x7f.1/",
        "http://127.1/",
        "http://[not-v6]/",
        "http://bad_host-.com/",
        "http://example.com/#frag",
        "http://example.com/" + "a" * ssrf.MAX_URL_LENGTH,
    ],
)
def test_url_syntax_rules(url: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        ssrf.check_url(url)


@pytest.mark.parametrize(
    "url",
    ["https://hooks.example.com/in?x=1", "http://127.0.0.1:8080/h", "http://[2606:4700::1111]/"],
)
def test_url_syntax_accepts(url: str) -> None:
    assert ssrf.check_url(url) == url


def test_create_body_is_strict() -> None:
    ok = webhooks.WebhookCreate.model_validate(
        {"url": "https://a.example/h", "events": ["task.created", "task.created"]}
    )
    assert ok.events == ["task.created"]
    star = webhooks.WebhookCreate.model_validate(
        {"url": "https://a.example/h", "events": ["task.deleted", "*"]}
    )
    assert star.events == ["*"]
    for bad in (
        {"url": "https://a.example/h", "events": []},
        {"url": "https://a.example/h", "events": ["task.exploded"]},
        {"url": "https://a.example/h", "events": "task.created"},
        {"url": "https://a.example/h", "events": ["task.created"], "secret": "mine"},
        {"url": {"$gt": ""}, "events": ["task.created"]},
    ):
        with pytest.raises(ValidationError):
            webhooks.WebhookCreate.model_validate(bad)


async def test_public_host_passes_and_is_resolved_once() -> None:
    resolve = fake_resolver({"hooks.example.com": ["93.184.216.34", "2606:4700::1111"]})
    target = await ssrf.check_target("https://hooks.example.com/in", [], resolve=resolve)
    assert target.host == "hooks.example.com"
    assert target.port == 443
    assert target.addresses == ((V4, "93.184.216.34"), (V6, "2606:4700::1111"))
    assert resolve.calls == ["hooks.example.com"]


async def test_one_private_address_among_public_ones_refuses_the_host() -> None:
    resolve = fake_resolver({"mixed.example.com": ["93.184.216.34", "10.0.0.7"]})
    with pytest.raises(TargetRefused, match="not allowed") as refused:
        await ssrf.check_target("http://mixed.example.com/", [], resolve=resolve)
    assert "10.0.0.7" not in str(refused.value)
    assert refused.value.reason.endswith("private address (10.0.0.7)")


async def test_rebinding_host_is_refused_when_it_turns_private() -> None:
    """The same name checked twice (registration, then delivery) with different answers."""
    table = {"rebind.example.com": ["93.184.216.34"]}
    resolve = fake_resolver(table)
    await ssrf.check_target("http://rebind.example.com/", [], resolve=resolve)
    table["rebind.example.com"] = ["127.0.0.1"]
    with pytest.raises(TargetRefused, match="not allowed"):
        await ssrf.check_target("http://rebind.example.com/", [], resolve=resolve)


async def test_ip_literals_are_checked_without_a_lookup() -> None:
    resolve = fake_resolver({})
    for url in ("http://127.0.0.1/", "http://[::1]:8080/", "http://169.254.169.254/latest"):
        with pytest.raises(TargetRefused):
            await ssrf.check_target(url, [], resolve=resolve)
    target = await ssrf.check_target("http://8.8.8.8/", [], resolve=resolve)
    assert target.addresses == ((V4, "8.8.8.8"),)
    assert resolve.calls == []


async def test_allow_list_is_by_host_only() -> None:
    resolve = fake_resolver({"localhost": ["127.0.0.1"], "svc.internal": ["10.1.1.1"]})
    allow = ["127.0.0.1", "SVC.internal.", "[::1]"]
    # The operator trusts a listed host: neither the address nor the port rule applies.
    assert (await ssrf.check_target("http://127.0.0.1:9/", allow, resolve=resolve)).allow_listed
    assert (await ssrf.check_target("http://[::1]/", allow, resolve=resolve)).allow_listed
    target = await ssrf.check_target("http://svc.internal/x", allow, resolve=resolve)
    assert target.addresses == ((V4, "10.1.1.1"),)
    # localhost resolves to an allow-listed address, but its name is not listed.
    with pytest.raises(TargetRefused, match="not allowed"):
        await ssrf.check_target("http://localhost/", allow, resolve=resolve)
    with pytest.raises(TargetRefused):
        await ssrf.check_target("http://10.0.0.1/", allow, resolve=resolve)


async def test_unresolvable_host() -> None:
    # The same answer as a private host's (no DNS oracle); the reason is for logs.
    with pytest.raises(TargetUnresolvable, match="not allowed") as unresolvable:
        await ssrf.check_target("http://nowhere.invalid/", [], resolve=fake_resolver({}))
    assert unresolvable.value.reason.startswith("the host nowhere.invalid does not resolve")
    empty = fake_resolver({"empty.example.com": []})
    with pytest.raises(TargetUnresolvable):
        await ssrf.check_target("http://empty.example.com/", [], resolve=empty)


async def test_real_resolver_refuses_localhost() -> None:
    """``localhost`` comes from /etc/hosts (no DNS traffic) and is loopback."""
    with pytest.raises(TargetRefused, match="not allowed"):
        await ssrf.check_target("http://localhost:8080/hook", [])


def test_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    body = b'{"id":"1","event":"task.created","created_at":"2026-01-01T00:00:00Z","data":{}}'
    expected = hmac.new(b"s3cret", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert webhooks.sign("s3cret", 1700000000, body) == "sha256=" + expected
    # A fixed vector (from `printf '1.{}' | openssl dgst -sha256 -hmac k`), so a change of
    # the scheme cannot pass by changing both sides.
    assert webhooks.sign("k", 1, b"{}") == (
        "sha256=3dd49b2593d0f9a349e9e71c4bde3e2b862c2be4003fe9b4ba81332029310158"
    )


def test_verify_rejects_tampering_and_stale_timestamps() -> None:
    body = b'{"a":1}'
    sig = webhooks.sign("s", 1000, body)
    assert webhooks.verify("s", "1000", body, sig, now=1000)
    assert not webhooks.verify("s", "1000", b'{"a":2}', sig, now=1000)
    assert not webhooks.verify("s", "1001", body, sig, now=1000)
    assert not webhooks.verify("other", "1000", body, sig, now=1000)
    assert not webhooks.verify("s", "1000", body, sig, now=1000 + 301)
    assert not webhooks.verify("s", "soon", body, sig, now=1000)


def test_secret_is_sealed_and_bound_to_its_webhook() -> None:
    settings = Settings(app_env="test", jwt_secret=TEST_SECRET)
    secret = webhooks.new_secret()
    assert len(secret) >= 43
    sealed = webhooks.seal_secret(settings, "hook-a", secret)
    assert secret.encode() not in bytes(sealed)
    assert webhooks.open_secret(settings, "hook-a", sealed) == secret
    with pytest.raises(webhooks.SecretUnreadable):
        webhooks.open_secret(settings, "hook-b", sealed)
    rotated = Settings(app_env="test", jwt_secret="another-secret-" + "y" * 40)
    with pytest.raises(webhooks.SecretUnreadable):
        webhooks.open_secret(rotated, "hook-a", sealed)


def test_request_headers_and_body() -> None:
    event = {
        "id": "65f0c0ffee00000000000001",
        "type": "task.created",
        "created_at": "2026-01-01T00:00:00Z",
        "data": {"task": {"id": "t1"}},
        "user_id": "u1",
    }
    body = webhooks.event_body(event)
    assert body == (
        '{"id":"65f0c0ffee00000000000001","event":"task.created",'
        '"created_at":"2026-01-01T00:00:00Z","data":{"task":{"id":"t1"}}}'
    )
    delivery = {"_id": "e:w", "event_id": event["id"], "event": "task.created", "body": body}
    headers = webhooks.request_headers(delivery, "s", 1234)
    assert headers["X-Webhook-Id"] == event["id"]
    assert headers["X-Webhook-Event"] == "task.created"
    assert headers["X-Webhook-Timestamp"] == "1234"
    assert headers["X-Webhook-Signature"] == webhooks.sign("s", 1234, body.encode())
