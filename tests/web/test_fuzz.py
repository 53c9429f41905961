"""Schema-driven fuzzing of the whole API with schemathesis.

The real app is served on loopback (over the real MongoDB test server and Redis) from an event
loop of its own, so schemathesis' synchronous client can call it. For every operation of the
document the app serves, Hypothesis draws requests from that document, valid and invalid, and
every answer must match it: no 5xx, a documented status, content type, headers and body, and
``application/problem+json`` for every error. A registered user's token, and real tasks with
their ETags, are mixed into the drawn requests, so operations are exercised beyond 401 and 404.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
import warnings
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import HypothesisWarning
from hypothesis import strategies as st
from schemathesis import Case, CheckContext, GenerationMode, Response

from config.settings import Settings
from web.routes import ROUTES

T = TypeVar("T")
TASKS = "/api/v1/tasks"
PASSWORD = "correct horse 1"
MAX_EXAMPLES = 40
OPERATIONS = [(route.method, route.path) for route in ROUTES]


class LiveServer:
    """``create_app(settings)`` served on a free loopback port from a thread of its own."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-app", daemon=True)
        self.runner: web.AppRunner | None = None

    def start(self) -> str:
        """Start serving; returns the base URL."""
        self.thread.start()
        return self._run(self._start())

    def stop(self) -> None:
        """Stop serving and close the loop (the app's cleanup runs first)."""
        if self.runner is not None:
            self._run(self.runner.cleanup())
        self._run(self.loop.shutdown_asyncgens())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    async def _start(self) -> str:
        from web.app import create_app

        self.runner = web.AppRunner(create_app(self.settings))
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        return f"http://{host}:{port}"


@dataclass
class Live:
    """The served app, an HTTP session to it and one registered account."""

    base: str
    http: requests.Session
    email: str = ""

    def register(self) -> dict[str, Any]:
        """Register this run's account."""
        self.email = f"fuzz-{uuid.uuid4().hex[:8]}@example.com"
        return self._post(
            "/api/v1/auth/register",
            {"email": self.email, "password": PASSWORD, "name": "Fuzz"},
            201,
        )

    def login(self) -> dict[str, Any]:
        """A new login of the account (its own access and refresh tokens)."""
        return self._post("/api/v1/auth/login", {"email": self.email, "password": PASSWORD}, 200)

    def new_task(self, auth: dict[str, str]) -> tuple[str, str]:
        """A fresh task of the account: ``(id, ETag)``."""
        resp = self.http.post(self.base + TASKS, json={"title": "seed"}, headers=auth, timeout=30)
        assert resp.status_code == 201, resp.text
        return resp.json()["id"], resp.headers["ETag"]

    def _post(self, path: str, body: dict[str, Any], status: int) -> dict[str, Any]:
        resp = self.http.post(self.base + path, json=body, timeout=30)
        assert resp.status_code == status, resp.text
        payload: dict[str, Any] = resp.json()
        return payload


@pytest.fixture
def live(make_settings: Any) -> Iterator[Live]:
    """The app on loopback with limits high enough that fuzzing is not throttled into 429s."""
    server = LiveServer(
        make_settings(
            rate_limit="1000000/minute",
            login_max_failures=1_000_000,
            login_max_failures_per_address=1_000_000,
        )
    )
    base = server.start()
    try:
        with requests.Session() as http:
            yield Live(base, http)
    finally:
        server.stop()


def problem_details(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """Every error is an RFC 9457 problem whose ``status`` is the answer's."""
    if response.status_code < 400:
        return None
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type.split(";")[0].strip() == "application/problem+json", (
        f"{response.status_code} answered as {content_type!r}, not problem+json"
    )
    body = response.json()
    assert body["status"] == response.status_code, body
    assert "Traceback" not in response.content.decode("utf-8", "replace")
    return None


def _has_input(operation: Any) -> bool:
    """Whether anything can be made invalid: a body, a path or query parameter, or a header
    with constraints (bare operations have no negative cases)."""
    definition = operation.definition.raw
    return "requestBody" in definition or any(
        p["in"] != "header" or set(p["schema"]) - {"type"}
        for p in definition.get("parameters", [])
    )


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_operation_matches_document(live: Live, method: str, path: str) -> None:
    schema = schemathesis.openapi.from_url(f"{live.base}/api/v1/openapi.json", timeout=30)
    operation = schema[path][method]
    op_id = operation.definition.raw["operationId"]
    token = live.register()["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    strategy = operation.as_strategy(GenerationMode.POSITIVE)
    if _has_input(operation):
        strategy = strategy | operation.as_strategy(GenerationMode.NEGATIVE)
    seen: set[int] = set()

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy, data=st.data())
    def run(case: Case, data: st.DataObject) -> None:
        headers = _prepare(case, data, live, auth, op_id)
        response = case.call(base_url=live.base, session=live.http, headers=headers, timeout=30)
        seen.add(response.status_code)
        case.validate_response(
            response,
            additional_checks=[problem_details],
            headers=headers,
            transport_kwargs={"base_url": live.base, "session": live.http, "headers": headers},
        )

    with warnings.catch_warnings():
        # The app's thread (PyMongo, redis-py) uses the global `random` while Hypothesis draws,
        # which it would mistake for a strategy using `random`.
        warnings.filterwarnings(
            "ignore", message="Do not use the `random` module", category=HypothesisWarning
        )
        run()
    # The run must have reached the operation's success path, not only its refusals.
    assert any(200 <= s < 400 for s in seen), f"{method} {path} never succeeded: {sorted(seen)}"


def _prepare(
    case: Case, data: st.DataObject, live: Live, auth: dict[str, str], op_id: str
) -> dict[str, str]:
    """Mix real credentials and resources into a drawn case; returns headers to send."""
    positive = case.meta is not None and case.meta.generation.mode.is_positive
    headers: dict[str, str] = {}
    if case.operation.definition.raw.get("security"):
        who = data.draw(st.sampled_from(["token", "token", "token", "none", "garbage"]), "auth")
        if who == "token":
            # Logging out ends the login: give it a login of its own.
            headers.update(
                {"Authorization": f"Bearer {live.login()['access_token']}"}
                if op_id == "logout"
                else auth
            )
        elif who == "garbage":
            headers["Authorization"] = "Bearer not-a-token"
        elif case.headers:
            case.headers.pop("Authorization", None)
    if "id" in (case.path_parameters or {}) and data.draw(st.booleans(), "real task"):
        task_id, etag = live.new_task(auth)
        case.path_parameters = {**(case.path_parameters or {}), "id": task_id}
        for name in ("If-Match", "If-None-Match"):
            if any(p.name == name for p in case.operation.iter_parameters()):
                choice = data.draw(st.sampled_from(["drawn", "current", "*", "stale"]), name)
                value = {"current": etag, "*": "*", "stale": f'"{task_id}.0"'}.get(choice)
                if value is not None:
                    headers[name] = value
    if positive and isinstance(case.body, dict):
        if op_id == "login" and data.draw(st.booleans(), "real login"):
            case.body = {"email": live.email, "password": PASSWORD}
        elif op_id == "refresh" and data.draw(st.booleans(), "real refresh token"):
            case.body = {"refresh_token": live.login()["refresh_token"]}
        elif op_id == "register" and data.draw(st.booleans(), "fresh email"):
            case.body = {**case.body, "email": f"{uuid.uuid4().hex[:10]}@example.com"}
        elif op_id == "bulk_tasks" and data.draw(st.booleans(), "real ids"):
            real = [live.new_task(auth)[0] for _ in range(2)]
            case.body = {**case.body, "ids": real + list(case.body.get("ids", []))[:3]}
    return headers
