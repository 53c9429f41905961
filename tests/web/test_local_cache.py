"""The web's in-process cache (core/local_cache.py) across replicas: two apps over one Redis
and one database, as two web processes behind a load balancer. Writes go to one, reads to the
other, at once: never a stale read, and the reads that can be answered in process are (no
Redis round trip). A logout through one replica stops its token at the other at once."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import REGISTRY

from tests.conftest import bearer, eventually, register
from web.app import create_app
from web.keys import CONTEXT

T = "/api/v1/tasks"


def local_hits() -> float:
    return REGISTRY.get_sample_value("local_cache_admissions_total", {"result": "hit"}) or 0.0


@pytest.fixture
async def replicas(make_settings: Any, aiohttp_client: Any) -> tuple[Any, Any]:
    settings = make_settings(rate_limit="100000/minute")
    a = await aiohttp_client(create_app(settings))
    b = await aiohttp_client(create_app(settings))
    for replica in (a, b):
        local = replica.app[CONTEXT].local
        assert local is not None
        await eventually(lambda local=local: local.armed, "the replica's tracker armed")
    return a, b


async def test_writes_through_one_replica_are_read_at_once_through_the_other(
    replicas: tuple[Any, Any],
) -> None:
    a, b = replicas
    auth = bearer((await register(a))["access_token"])
    hits = local_hits()
    for n in range(1, 21):
        created = await a.post(T, json={"title": f"t{n}"}, headers=auth)
        assert created.status == 201
        task_id = (await created.json())["id"]
        for _ in range(4):
            stats = await b.get(f"{T}/stats", headers=auth)
            page = await b.get(T, headers=auth)
            assert (await stats.json())["total"] == n, "stale stats after a write elsewhere"
            assert (await page.json())["items"][0]["id"] == task_id, "stale first page"
        if n % 5 == 0:  # and a change, then a delete, through the other replica
            done = await b.patch(f"{T}/{task_id}", json={"status": "done"}, headers=auth)
            assert done.status == 200
            by_status = (await (await a.get(f"{T}/stats", headers=auth)).json())["by_status"]
            assert by_status["done"] == n // 5
    # Each round: the first reads after the write go to Redis, the rest are answered here.
    assert local_hits() - hits >= 60


async def test_a_held_read_makes_no_redis_round_trip(replicas: tuple[Any, Any]) -> None:
    a, _ = replicas
    auth = bearer((await register(a))["access_token"])
    for _ in range(4):  # learn the token, the entry and a lease
        assert (await a.get(f"{T}/stats", headers=auth)).status == 200
    redis = a.app[CONTEXT].redis
    sent: list[Any] = []
    original = redis.execute_command

    async def counting(*args: Any, **options: Any) -> Any:
        sent.append(args)
        return await original(*args, **options)

    redis.execute_command = counting
    answer = await a.get(f"{T}/stats", headers=auth)
    assert answer.status == 200 and answer.headers["X-Cache"] == "hit"
    assert answer.headers["RateLimit"].startswith('"default";r=')
    assert sent == []


async def test_a_logout_through_one_replica_stops_the_token_at_the_other(
    replicas: tuple[Any, Any],
) -> None:
    a, b = replicas
    auth = bearer((await register(a))["access_token"])
    for _ in range(4):
        assert (await b.get(f"{T}/stats", headers=auth)).status == 200
    assert (await a.post("/api/v1/auth/logout", headers=auth)).status == 204
    refused = await b.get(f"{T}/stats", headers=auth)
    assert refused.status == 401 and (await refused.json())["detail"] == "Token has been revoked"


async def test_without_a_tracker_nothing_is_answered_in_process(
    make_settings: Any, aiohttp_client: Any
) -> None:
    client = await aiohttp_client(create_app(make_settings(local_cache=False)))
    assert client.app[CONTEXT].local is None
    auth = bearer((await register(client))["access_token"])
    hits = local_hits()
    for _ in range(5):
        assert (await client.get(f"{T}/stats", headers=auth)).status == 200
    assert local_hits() == hits
