"""The in-process cache's rules (core/local_cache.py), without Redis: what it answers, what a
push or a late reply does to it, how leases grow and give back. The tracker and the script
are exercised on real Redis in tests/core/test_tracking.py and tests/web/test_local_cache.py."""

from __future__ import annotations

import time
from typing import Any

import pytest

from core import local_cache
from core.local_cache import LocalCache, Snapshot

P = "tp:"


def entry(gen: int, until: float | None = None) -> bytes:
    return f"{gen} {until or time.time() + 60}\n".encode() + b'{"total": 1}'


def learn(cache: LocalCache, snap: Snapshot, **overrides: Any) -> None:
    values: dict[str, Any] = {
        "jti": "j1",
        "login": "l1",
        "user": "u1",
        "caller": "user:u1",
        "granted": 3,
        "asked": 3,
        "remaining": 50,
        "reset": 1,
        "cached": ("stats", b"7", entry(7)),
    }
    values.update(overrides)
    cache.learn(snap, **values)


def quick(cache: LocalCache, name: str | None = "stats") -> Any:
    return cache.quick("j1", "l1", "u1", "user:u1", name)


@pytest.fixture
def cache() -> LocalCache:
    c = LocalCache(P)
    c.arm(60)
    return c


def test_answers_what_a_round_trip_taught_until_the_lease_is_spent(cache: LocalCache) -> None:
    assert quick(cache) is None  # nothing learnt yet
    learn(cache, cache.snapshot())  # 3 taken: one for that request, two left here
    first, second = quick(cache), quick(cache)
    assert first.cached[0] == b"7" and first.cached[1].endswith(b'{"total": 1}')
    assert (first.remaining, second.remaining) == (51, 50)  # shared 50 + what is held here
    assert quick(cache) is None  # lease spent: the next request goes to Redis


def test_nothing_is_answered_unarmed_or_when_the_tracker_went_quiet(cache: LocalCache) -> None:
    learn(cache, cache.snapshot())
    cache.alive(-1)  # no pong for too long
    assert quick(cache) is None
    cache.alive(60)
    assert quick(cache) is not None
    cache.disarm()
    learn(cache, cache.snapshot())
    assert quick(cache) is None


def test_a_push_drops_the_users_entries_and_the_tokens_it_names(cache: LocalCache) -> None:
    learn(cache, cache.snapshot(), granted=10, asked=10)
    cache.invalidate([P + "gen:u1"])
    assert quick(cache) is None  # the entry is gone
    assert quick(cache, None) is not None  # token and lease still answer uncached routes
    cache.invalidate([P + "deny:login:l1"])
    assert quick(cache, None) is None
    learn(cache, cache.snapshot(), granted=10, asked=10)
    cache.invalidate([P + "deny:jti:j1"])
    assert quick(cache, None) is None
    learn(cache, cache.snapshot(), granted=10, asked=10)
    cache.invalidate(None)  # FLUSHDB / FLUSHALL
    assert quick(cache, None) is None


def test_a_reply_overtaken_by_a_push_teaches_nothing(cache: LocalCache) -> None:
    """The round trip read generation 7; a write's push arrived before its reply: storing
    the entry now would serve the pre-write value after the write."""
    snap = cache.snapshot()
    cache.invalidate([P + "gen:u1"])
    learn(cache, snap)
    assert quick(cache) is None
    assert quick(cache, None) is not None  # the token was not pushed: it is kept
    snap = cache.snapshot()
    cache.invalidate([P + "deny:jti:j1"])
    learn(cache, snap)
    assert quick(cache, None) is None


def test_a_reply_from_before_a_reconnect_teaches_nothing(cache: LocalCache) -> None:
    snap = cache.snapshot()
    cache.disarm()
    cache.arm(60)  # pushes may have been missed in between
    learn(cache, snap)
    assert quick(cache, None) is None


def test_an_entry_past_its_time_or_of_another_generation_is_not_served(
    cache: LocalCache,
) -> None:
    learn(cache, cache.snapshot(), granted=10, asked=10, cached=("stats", b"7", entry(6)))
    assert quick(cache) is None
    learn(cache, cache.snapshot(), granted=10, asked=10, cached=("stats", b"7", entry(7, 1.0)))
    assert quick(cache) is None
    learn(cache, cache.snapshot(), granted=10, asked=10, cached=("stats", b"7", entry(7)))
    assert quick(cache) is not None


def test_leases_grow_while_used_up_and_give_back_what_was_left(
    cache: LocalCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = 1000
    assert cache.lease_request("user:u1", limit) == (1, 0)  # a stranger takes one
    learn(cache, cache.snapshot(), granted=1, asked=1)
    assert cache.lease_request("user:u1", limit) == (2, 0)  # used up in time: double
    learn(cache, cache.snapshot(), granted=2, asked=2)
    assert quick(cache) is not None
    assert cache.lease_request("user:u1", limit) == (4, 0)
    learn(cache, cache.snapshot(), granted=4, asked=4)  # 3 left here
    # In time but asked again (e.g. a cache miss): the 3 go back, the size stays.
    assert cache.lease_request("user:u1", limit) == (4, 3)
    assert cache.lease_request("user:u1", limit) == (8, 0)  # given back once only
    learn(cache, cache.snapshot(), granted=8, asked=8)
    later = time.monotonic() + local_cache.LEASE_SECONDS + 1
    monkeypatch.setattr(local_cache.time, "monotonic", lambda: later)
    assert quick(cache) is None  # expired: not spent any more
    assert cache.lease_request("user:u1", limit) == (4, 7)  # halved, the 7 given back


def test_leases_never_exceed_a_tenth_of_the_limit(cache: LocalCache) -> None:
    learn(cache, cache.snapshot(), granted=1, asked=1)
    assert cache.lease_request("user:u1", 25) == (2, 0)
    learn(cache, cache.snapshot(), granted=2, asked=2)
    quick(cache)
    assert cache.lease_request("user:u1", 25) == (2, 0)  # 25 // 10
    assert cache.lease_request("user:u1", 9) == (1, 0)  # small limits: one at a time


def test_cached_bodies_are_bounded_in_bytes(
    cache: LocalCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_cache, "MAX_BYTES", 3 * len(entry(7)))
    for user in ("a", "b", "c", "d"):
        learn(cache, cache.snapshot(), user=user, cached=("stats", b"7", entry(7)))
    assert cache._bytes <= local_cache.MAX_BYTES
    assert "a" not in cache._entries and "d" in cache._entries  # the oldest went first
