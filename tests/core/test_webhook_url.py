"""The documented webhook URL pattern and the server's syntax check agree, both ways."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.ssrf import check_url
from core.webhook_url import URL_PATTERN

PATTERN = re.compile(URL_PATTERN)
QUICK = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


def accepted(url: str) -> bool:
    try:
        check_url(url)
    except ValueError:
        return False
    return True


@QUICK
@given(st.from_regex(URL_PATTERN, fullmatch=True))
def test_every_url_the_pattern_allows_passes_the_check(url: str) -> None:
    assert accepted(url), url


#: Pieces of URLs, valid and not, that the syntax rules are about.
_PIECE = st.sampled_from(
    [
        "a", "Z", "0", "9", "_", "-", ".", ":", "[", "]", "@", "/", "?", "#", "%", " ", "\t", "x",
        "0x1", "::1", "1.2.3.4", "256", "ffff", "é", "65535", "65536", "80",
    ]
)  # fmt: skip


@QUICK
@given(
    st.sampled_from(["http://", "HTTPS://", "hTtP://", "ftp://", "http:/", "//", ""]),
    st.lists(_PIECE, max_size=10).map("".join),
)
def test_the_check_refuses_what_the_pattern_does(scheme: str, rest: str) -> None:
    url = scheme + rest
    assert accepted(url) is (PATTERN.fullmatch(url) is not None), url


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://example.com/hook?x=1", True),
        ("HTTP://EXAMPLE.COM", True),
        ("http://127.0.0.1:8080/", True),
        ("http://[2001:db8::1]/", True),
        ("http://a.b.c./x", True),
        ("ftp://example.com/", False),
        ("http://user:pw@example.com/", False),
        ("http://example.com/#frag", False),
        ("http://example.com:0/", False),
        ("http://example.com:65536/", False),
        ("http://127.1/", False),
        ("http://0x7f.1/", False),
        ("http://exa mple.com/", False),
        ("0", False),
    ],
)
def test_examples(url: str, ok: bool) -> None:
    assert accepted(url) is ok, url
    assert (PATTERN.fullmatch(url) is not None) is ok, url
