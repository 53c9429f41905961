"""The idempotency protocol against the real MongoDB test server: claim, replay, release."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest

from core import idempotency
from core.context import Context
from core.errors import Conflict, Invalid
from core.idempotency import Claim, StoredResponse
from core.store import utcnow

SCOPE = "user:64b000000000000000000001"
CREATED = StoredResponse(
    status=201,
    headers={"Content-Type": "application/json", "Location": "/api/v1/things/1"},
    body=b'{"id":"1","secret":"refresh-token-shown-once"}',
)


class Counting:
    """A stand-in handler: counts its calls and answers (or raises) what it is told."""

    def __init__(self, answer: StoredResponse | BaseException = CREATED) -> None:
        self.calls = 0
        self.answer = answer
        self.gate: asyncio.Event | None = None

    async def __call__(self) -> StoredResponse:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


def run(
    ctx: Context, call: Callable[[], Awaitable[StoredResponse]], *, key: str = "k1", fp: str = "a"
) -> Awaitable[idempotency.Outcome]:
    return idempotency.run(ctx, SCOPE, key, fp, call)


async def record(ctx: Context, key: str = "k1", scope: str = SCOPE) -> dict[str, Any] | None:
    return await ctx.store[idempotency.COLLECTION].find_one(
        {"_id": idempotency.record_id(scope, key)}
    )


async def test_three_concurrent_claims_exactly_one_wins(ctx: Context) -> None:
    results = await asyncio.gather(
        *(idempotency.claim(ctx, SCOPE, "k1", "a") for _ in range(3)), return_exceptions=True
    )
    winners = [r for r in results if isinstance(r, Claim)]
    assert len(winners) == 1, results
    losers = [r for r in results if not isinstance(r, Claim)]
    assert all(isinstance(r, Conflict) for r in losers), losers
    assert all(r.headers == {"Retry-After": "1"} for r in losers if isinstance(r, Conflict))
    doc = await record(ctx)
    assert doc is not None
    assert doc["owner"] == winners[0].owner
    assert doc["state"] == "in_progress"


async def test_concurrent_runs_call_the_handler_once(ctx: Context) -> None:
    handler = Counting()
    handler.gate = asyncio.Event()
    tasks = [asyncio.create_task(run(ctx, handler)) for _ in range(3)]
    # The winner is held inside the handler until both others have had their answer.
    while sum(t.done() for t in tasks) < 2:
        await asyncio.sleep(0.01)
    handler.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    outcomes = [r for r in results if isinstance(r, idempotency.Outcome)]
    assert handler.calls == 1
    assert len(outcomes) == 1
    assert not outcomes[0].replayed
    assert sum(isinstance(r, Conflict) for r in results) == 2
    again = await run(ctx, handler)
    assert again.replayed
    assert again.response == CREATED
    assert handler.calls == 1


async def test_repeat_replays_the_stored_response(ctx: Context) -> None:
    handler = Counting()
    first = await run(ctx, handler)
    second = await run(ctx, handler)
    assert (first.replayed, second.replayed) == (False, True)
    assert second.response == first.response == CREATED
    assert handler.calls == 1
    doc = await record(ctx)
    assert doc is not None
    assert doc["state"] == "done"
    assert doc["expires_at"] - doc["created_at"] == idempotency.TTL


async def test_stored_body_is_encrypted_and_fingerprint_is_keyed(ctx: Context) -> None:
    fp = idempotency.fingerprint(ctx, "POST", "/x", b'{"password":"hunter2hunter2"}')
    await run(ctx, Counting(), fp=fp)
    doc = await record(ctx)
    assert doc is not None
    assert b"refresh-token-shown-once" not in bytes(doc["body"])
    assert "k1" not in doc["_id"]
    plain = hashlib.sha256(b'POST\n/x\n{"password":"hunter2hunter2"}').hexdigest()
    assert doc["fingerprint"] != plain


async def test_replay_under_another_secret_is_refused(ctx: Context, make_settings: Any) -> None:
    await run(ctx, Counting())
    rotated = Context(
        make_settings(mongodb_db=ctx.settings.mongodb_db, jwt_secret="another-" + "y" * 40),
        ctx.store,
        ctx.redis,
    )
    with pytest.raises(Conflict, match="can no longer be replayed"):
        await run(rotated, Counting())


async def test_same_key_different_request_is_invalid(ctx: Context) -> None:
    handler = Counting()
    await run(ctx, handler, fp="a")
    with pytest.raises(Invalid) as caught:
        await run(ctx, handler, fp="b")
    assert [e.field for e in caught.value.errors] == ["header.Idempotency-Key"]
    assert handler.calls == 1


async def test_different_request_while_first_runs_is_invalid(ctx: Context) -> None:
    await idempotency.claim(ctx, SCOPE, "k1", "a")
    with pytest.raises(Invalid):
        await idempotency.claim(ctx, SCOPE, "k1", "b")


async def test_exception_releases_the_key(ctx: Context) -> None:
    failing = Counting(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        await run(ctx, failing)
    assert await record(ctx) is None
    handler = Counting()
    outcome = await run(ctx, handler)
    assert not outcome.replayed
    assert handler.calls == 1


async def test_cancellation_releases_the_key(ctx: Context) -> None:
    handler = Counting()
    handler.gate = asyncio.Event()
    task = asyncio.create_task(run(ctx, handler))
    while handler.calls == 0:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await record(ctx) is None


@pytest.mark.parametrize("status", [500, 503, 429])
async def test_server_errors_and_429_release_the_key(ctx: Context, status: int) -> None:
    handler = Counting(StoredResponse(status=status, headers={}, body=b"{}"))
    outcome = await run(ctx, handler)
    assert outcome.response.status == status
    assert await record(ctx) is None
    await run(ctx, handler)
    assert handler.calls == 2


async def test_client_errors_are_stored_and_replayed(ctx: Context) -> None:
    conflict = StoredResponse(
        status=409, headers={"Content-Type": "application/problem+json"}, body=b'{"status":409}'
    )
    handler = Counting(conflict)
    await run(ctx, handler)
    again = await run(ctx, handler)
    assert again.replayed
    assert again.response == conflict
    assert handler.calls == 1


async def test_scopes_are_independent(ctx: Context) -> None:
    mine = await idempotency.claim(ctx, "user:a", "k1", "a")
    theirs = await idempotency.claim(ctx, "user:b", "k1", "b")
    assert isinstance(mine, Claim)
    assert isinstance(theirs, Claim)
    assert mine.id != theirs.id


async def test_a_lapsed_lease_can_be_taken_over(ctx: Context) -> None:
    crashed = await idempotency.claim(ctx, SCOPE, "k1", "a")
    assert isinstance(crashed, Claim)
    with pytest.raises(Conflict):
        await idempotency.claim(ctx, SCOPE, "k1", "a")
    await ctx.store[idempotency.COLLECTION].update_one(
        {"_id": crashed.id}, {"$set": {"lease_until": utcnow() - timedelta(seconds=1)}}
    )
    successor = await idempotency.claim(ctx, SCOPE, "k1", "a")
    assert isinstance(successor, Claim)
    assert successor.owner != crashed.owner
    # The crashed request, should it wake up, can neither store nor release the key now.
    assert not await idempotency.complete(ctx, crashed, CREATED)
    assert not await idempotency.release(ctx, crashed)
    assert await idempotency.complete(ctx, successor, CREATED)
    assert await idempotency.claim(ctx, SCOPE, "k1", "a") == CREATED


async def test_a_record_past_its_ttl_is_forgotten(ctx: Context) -> None:
    await run(ctx, Counting(), fp="a")
    await ctx.store[idempotency.COLLECTION].update_one(
        {"_id": idempotency.record_id(SCOPE, "k1")},
        {"$set": {"expires_at": utcnow() - timedelta(seconds=1)}},
    )
    handler = Counting()
    outcome = await run(ctx, handler, fp="b")  # not 422: the old use is over
    assert not outcome.replayed
    assert handler.calls == 1


async def test_fingerprint_ignores_json_layout_but_not_content(ctx: Context) -> None:
    same = idempotency.fingerprint(ctx, "POST", "/t", b'{"a": 1, "b": [1, 2]}')
    assert same == idempotency.fingerprint(ctx, "post", "/t", b'{"b":[1,2],"a":1}')
    assert same != idempotency.fingerprint(ctx, "POST", "/t", b'{"a": 2, "b": [1, 2]}')
    assert same != idempotency.fingerprint(ctx, "POST", "/u", b'{"a": 1, "b": [1, 2]}')
    assert idempotency.fingerprint(ctx, "POST", "/t", b"") != idempotency.fingerprint(
        ctx, "POST", "/t", b"x"
    )


@pytest.mark.parametrize("key", ["a", "x" * 255, "2f1c-UUID:with spaces/and~symbols"])
def test_good_keys(key: str) -> None:
    assert idempotency.check_key(key) == key


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there", "new\nline", "caf\u00e9", "\x7f"])
def test_bad_keys(key: str) -> None:
    with pytest.raises(Invalid) as caught:
        idempotency.check_key(key)
    assert caught.value.errors[0].field == "header.Idempotency-Key"
