"""Operations endpoints: /metrics counts what happened, /docs needs no network, /readyz
names the dependency that is down."""

from __future__ import annotations

import asyncio
import shutil
from html.parser import HTMLParser
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cli.embedded import EmbeddedMongo, PrivateRedis
from web.app import create_app
from web.handlers.probes import READY_CACHE_SECONDS

pytestmark = pytest.mark.timeout(90)


def _value(text: str, name: str, **labels: str) -> float:
    """One sample of a scrape (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


async def _scrape(client: Any) -> str:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    text: str = await resp.text()
    return text


async def test_metrics_count_requests_by_route_and_status(client: Any) -> None:
    before = await _scrape(client)
    for _ in range(2):
        assert (await client.get("/healthz")).status == 200
    assert (await client.get("/api/v1/me")).status == 401
    assert (await client.get("/no/such/thing-8d1f")).status == 404
    after = await _scrape(client)

    assert 'http_requests_total{method="GET",route="/healthz",status="200"}' in after
    assert 'http_requests_total{method="GET",route="/api/v1/me",status="401"}' in after

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    total = "http_requests_total"
    assert delta(total, method="GET", route="/healthz", status="200") == 2
    assert delta(total, method="GET", route="/api/v1/me", status="401") == 1
    # Unknown paths share one label value: a scanner cannot explode the series count.
    assert delta(total, method="GET", route="unmatched", status="404") == 1
    assert "thing-8d1f" not in after
    # The first scrape is counted once it has answered.
    assert delta(total, method="GET", route="/metrics", status="200") == 1
    assert delta("http_request_duration_seconds_count", route="/healthz") == 2


class _Assets(HTMLParser):
    """Collects what a browser would fetch to render the page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = {"script": "src", "link": "href", "img": "src"}.get(tag)
        for name, value in attrs:
            if name == wanted and value:
                self.urls.append(value)


async def test_docs_page_is_served_entirely_from_this_server(client: Any) -> None:
    resp = await client.get("/docs")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    page = await resp.text()
    assets = _Assets()
    assets.feed(page)
    assert len(assets.urls) >= 3, assets.urls
    for url in assets.urls:
        assert url.startswith("/docs/static/"), f"{url} is not same-origin"
        asset = await client.get(url)
        assert asset.status == 200, url
        assert len(await asset.read()) > 0, url
    # The document Swagger UI loads is ours, and the online validator badge (an image from
    # validator.swagger.io carrying the document's URL) is switched off.
    assert 'url: "/api/v1/openapi.json"' in page
    assert "validatorUrl: null" in page
    assert "https://" not in page.replace("https://taskmanager.dev", "")


async def test_readyz_answers_ready_when_both_dependencies_answer(client: Any) -> None:
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert await resp.json() == {
        "status": "ready",
        "checks": {"mongodb": "ok", "redis": "ok"},
        "outbox": {"oldest_pending_age_seconds": None, "pending": 0, "set_aside": 0},
    }


async def test_readyz_shows_the_outbox_lag(client: Any, ctx: Any) -> None:
    from datetime import timedelta

    from core.events import new_event
    from core.store import utcnow

    event = new_event("user.logged_in", user_id="u1")
    event["created_at"] = utcnow() - timedelta(seconds=90)
    # Held by another relay's lease, so this app's relay leaves it pending meanwhile.
    event["lease_until"] = utcnow() + timedelta(minutes=5)
    event["lease_owner"] = "another-relay"
    await ctx.store["events"].insert_one(event)
    body = await (await client.get("/readyz")).json()
    assert body["outbox"]["pending"] == 1
    assert body["outbox"]["oldest_pending_age_seconds"] >= 90


async def test_readyz_is_503_naming_redis_when_it_is_down(
    make_settings: Any, aiohttp_client: Any
) -> None:
    redis_server = PrivateRedis().start()
    try:
        # A copy: the fixture's clean-up must not try to reach the stopped server.
        settings = make_settings().model_copy(update={"redis_url": redis_server.url})
        client = await aiohttp_client(create_app(settings))
        assert (await client.get("/readyz")).status == 200
        redis_server.stop()
        await asyncio.sleep(READY_CACHE_SECONDS)  # the last answer is reused that long
        resp = await client.get("/readyz")
        assert resp.status == 503
        assert resp.content_type == "application/problem+json"
        problem = await resp.json()
        assert problem["status"] == 503
        assert "redis" in problem["detail"]
        assert "mongodb" not in problem["detail"]
        # Liveness does not depend on anything.
        assert (await client.get("/healthz")).status == 200
    finally:
        redis_server.stop()
        shutil.rmtree(redis_server.dir, ignore_errors=True)


async def test_readyz_is_503_naming_mongodb_when_it_is_down(
    make_settings: Any, aiohttp_client: Any
) -> None:
    mongo = EmbeddedMongo(":memory:").start()
    try:
        settings = make_settings().model_copy(
            update={"mongodb_url": mongo.url, "mongodb_timeout_ms": 300}
        )
        client = await aiohttp_client(create_app(settings))
        assert (await client.get("/readyz")).status == 200
        mongo.stop()
        await asyncio.sleep(READY_CACHE_SECONDS)
        resp = await client.get("/readyz")
        assert resp.status == 503
        problem = await resp.json()
        assert "mongodb" in problem["detail"]
        assert "redis" not in problem["detail"]
    finally:
        mongo.stop()
