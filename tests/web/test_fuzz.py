"""Schema-driven fuzzing of the whole API with schemathesis.

The real app is served on loopback (over the real MongoDB test server and Redis) from an event
loop of its own, so schemathesis' synchronous client can call it. For every operation of the
document the app serves, Hypothesis draws requests from that document, valid and invalid, and
every answer must match it: no 5xx, a documented status, content type, headers and body, and
``application/problem+json`` for every error.

Real credentials and real resources (tasks with their ETags, webhooks and their deliveries,
queue and schedule names, queued messages ready, delayed and dead, cursors) are mixed into the
drawn requests, so each operation is exercised beyond 401 and 404; what a JSON schema cannot
say (an email must be deliverable, a webhook target must resolve to an allowed address) is
filled in for the valid cases only.

Besides this per-operation run, ``test_schemathesis_run_with_every_check_finds_nothing`` runs
schemathesis' engine as ``st run --checks all`` does (coverage, fuzzing and stateful phases,
the document's links chaining calls); :class:`FillIn` lists what it fills into valid requests.

A new route is fuzzed as soon as it is in the table. If its success needs a resource that
cannot be drawn, give it one in ``Fuzz._resources``; if its input obeys a rule a JSON schema
cannot state, fill that in (valid cases only) in ``Fuzz._fill_in``; otherwise the test says the
operation "never succeeded".
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
import warnings
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import pytest
import requests
import schemathesis
from aiohttp import web
from dramatiq import Worker
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import HypothesisWarning
from schemathesis import Case, CheckContext, GenerationMode, Response
from schemathesis.engine import Status, events
from schemathesis.engine.events import PhaseFinished
from schemathesis.specs.openapi.checks import ignored_auth

from config.settings import WEIGHT_KEY, Settings
from web.routes import ROUTES

T = TypeVar("T")
API = "/api/v1"
PASSWORD = "correct horse 1"
ADMIN_EMAIL = "fuzz-admin@example.com"
#: Nobody listens there: deliveries fail and are retried, but they exist.
HOOK_URL = "http://127.0.0.1:9/hook"
MAX_EXAMPLES = 40
#: Operations whose valid cases always name a real resource: a dead-letter list's only path
#: parameter is a queue, and a drawn name is a 404 (a clean-clone CI run once drew no real
#: queue in a valid case: {401, 403, 404, 422}).
ALWAYS_REAL = {"list_dead"}
#: Operations on one queued message, and the states of the messages each is given in turn.
MESSAGE_STATES = {
    "get_dead": ["dead"],
    "delete_dead": ["dead"],
    "retry_message": ["ready", "delayed", "dead"],
    "delete_message": ["ready", "delayed", "dead"],
    "get_message": ["ready", "delayed", "dead"],
}
OPERATIONS = [(route.method, route.path) for route in ROUTES]
ROUTE_OF = {(route.method, route.path): route for route in ROUTES}
#: A request the schema calls valid may still be refused for the state it meets (412).
CONFIG = schemathesis.Config.from_str(
    """
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "412", "429"]
"""
)


def _too_common(password: Any) -> bool:
    """Whether registration refuses ``password`` by a rule the document cannot state."""
    from core.account_rules import check_password

    if not isinstance(password, str):
        return False
    try:
        check_password(password)
    except ValueError:
        return True
    return False


class LiveServer:
    """``create_app(settings)`` served on a free loopback port from a thread of its own."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-app", daemon=True)
        self.runner: web.AppRunner | None = None
        self.worker: Worker | None = None

    @property
    def app(self) -> web.Application:
        assert self.runner is not None
        return self.runner.app

    def start(self) -> str:
        """Start serving; returns the base URL."""
        self.thread.start()
        return self.run(self._start())

    def start_worker(self, queues: set[str] | None = None) -> None:
        """Run the app's actors in this process (for what only workers create): of every queue,
        or only of ``queues`` (once per test: the first call decides)."""
        from web.keys import PLATFORM

        if self.worker is None:
            broker = self.app[PLATFORM].broker
            self.worker = Worker(broker, queues=queues, worker_threads=2, worker_timeout=100)
            self.worker.start()

    def stop(self) -> None:
        """Stop the worker, then serving; the app's cleanup runs before the loop closes."""
        if self.worker is not None:
            self.worker.stop()
        if self.runner is not None:
            self.run(self.runner.cleanup())
        self.run(self.loop.shutdown_asyncgens())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the app's loop (where its clients live) and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    async def _start(self) -> str:
        from web.app import MAX_LINE_SIZE, create_app

        self.runner = web.AppRunner(create_app(self.settings), max_line_size=MAX_LINE_SIZE)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        return f"http://{host}:{port}"


class Live:
    """The served app, an HTTP session to it, a user and an admin."""

    def __init__(self, server: LiveServer, base: str, http: requests.Session):
        self.server = server
        self.base = base
        self.http = http
        self.email = f"fuzz-{uuid.uuid4().hex[:8]}@example.com"
        pair = self.call("POST", "/auth/register", None, self.credentials(), 201)
        self.user_id = str(pair["user"]["id"])
        self.user = self.bearer(pair)
        admin = {"email": ADMIN_EMAIL, "password": PASSWORD}
        signed_in = self.call("POST", "/auth/login", None, admin, 200)
        self.admin = self.bearer(signed_in)
        self.admin_id = str(signed_in["user"]["id"])
        self._names: dict[str, list[str]] = {}

    def credentials(self) -> dict[str, str]:
        """The user's sign-in body (register adds a name)."""
        return {"email": self.email, "password": PASSWORD, "name": "Fuzz"}

    @staticmethod
    def bearer(pair: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {pair['access_token']}"}

    def call(
        self,
        method: str,
        path: str,
        auth: dict[str, str] | None,
        body: Any = None,
        status: int = 200,
        params: dict[str, Any] | None = None,
    ) -> Any:
        """One API call that must answer ``status``; returns its JSON body (or None)."""
        resp = self.http.request(
            method, self.base + API + path, json=body, headers=auth, params=params, timeout=30
        )
        assert resp.status_code == status, f"{method} {path}: {resp.status_code} {resp.text}"
        return resp.json() if resp.content else None

    def login(self) -> dict[str, Any]:
        """A new login of the user (its own access and refresh tokens)."""
        pair: dict[str, Any] = self.call(
            "POST", "/auth/login", None, {"email": self.email, "password": PASSWORD}
        )
        return pair

    def new_task(self) -> tuple[str, str]:
        """A fresh task of the user: ``(id, ETag)``."""
        resp = self.http.post(
            f"{self.base}{API}/tasks", json={"title": "seed"}, headers=self.user, timeout=30
        )
        assert resp.status_code == 201, resp.text
        return resp.json()["id"], resp.headers["ETag"]

    def new_webhook(self) -> str:
        """A fresh webhook of the user (on every event)."""
        hook = self.call("POST", "/webhooks", self.user, {"url": HOOK_URL, "events": ["*"]}, 201)
        return str(hook["id"])

    def new_delivery(self) -> tuple[str, str]:
        """A webhook with one delivery (made by the workers from a task event)."""
        self.server.start_worker()
        hook_id = self.new_webhook()
        self.new_task()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            page = self.call("GET", f"/webhooks/{hook_id}/deliveries", self.user)
            if page["items"]:
                return hook_id, str(page["items"][0]["id"])
            time.sleep(0.1)
        raise AssertionError("the workers made no webhook delivery")

    def new_notification(self) -> str:
        """A fresh in-app notification of the user (as the workers make them)."""
        from core.notifications import NewNotification, create_notifications
        from web.keys import CONTEXT

        item = NewNotification(
            user_id=self.user_id, key=uuid.uuid4().hex, kind="welcome", title="Hi", body="Hello"
        )
        assert self.server.run(create_notifications(self.server.app[CONTEXT], [item])) == 1
        return str(self.call("GET", "/notifications", self.user)["items"][0]["id"])

    def new_message(self, state: str) -> tuple[str, str]:
        """A fresh message of the app's broker in ``state``: ``(queue, broker id)``. A dead
        letter is a welcome message whose argument is no event (it dies at once in a worker
        that takes only that queue); a ready or delayed one (due in a day) waits in a queue no
        worker takes."""
        from web.keys import PLATFORM

        actors = self.server.app[PLATFORM].actors
        if state != "dead":
            actor = actors["index_task"]
            delay = 86_400_000 if state == "delayed" else None
            sent = actor.send_with_options(args=({"id": "fuzz"},), delay=delay)
            return actor.queue_name, str(sent.options["redis_message_id"])
        actor = actors["send_welcome_email"]
        self.server.start_worker({actor.queue_name})
        rid = str(actor.send({"id": "fuzz"}).options["redis_message_id"])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            url = f"{self.base}{API}/admin/messages/{rid}"
            resp = self.http.get(url, headers=self.admin, timeout=30)
            if resp.status_code == 200 and resp.json()["state"] == "dead":
                return actor.queue_name, rid
            time.sleep(0.05)
        raise AssertionError("the worker made no dead letter")

    def new_share_weight(self) -> str:
        """A fresh key with a weight stored through the API (DELETE has one to drop)."""
        key = f"fuzz-{uuid.uuid4().hex[:12]}"
        self.call("PUT", f"/admin/share-weights/{key}", self.admin, {"weight": 2})
        return key

    def victim(self) -> str:
        """Another user's id, for operations on users (revoking the fuzzing user's own logins
        would end the run)."""
        if "victim" not in self._names:
            body = {
                "email": f"victim-{uuid.uuid4().hex[:8]}@example.com",
                "password": PASSWORD + " victim",
                "name": "Victim",
            }
            pair = self.call("POST", "/auth/register", None, body, 201)
            self._names["victim"] = [str(pair["user"]["id"])]
        return self._names["victim"][0]

    def backup(self) -> str:
        """A backup's id (one is started once; another is refused while it runs)."""
        if "backup" not in self._names:
            started = self.call("POST", "/admin/backups", self.admin, status=202)
            self._names["backup"] = [str(started["id"])]
        return self._names["backup"][0]

    def names(self, path: str, key: str) -> list[str]:
        """Names listed by an admin collection (queues, schedules)."""
        if path == "/admin/schedules" and path not in self._names:
            self._publish_schedule()
        if path not in self._names:
            items = self.call("GET", path, self.admin)["items"]
            self._names[path] = [str(item[key]) for item in items]
            assert self._names[path], f"{path} lists nothing"
        return self._names[path]

    def _publish_schedule(self) -> None:
        """Publish the schedule as a running scheduler does."""
        from jobs.scheduler import Scheduler
        from web.keys import CONTEXT, PLATFORM

        app = self.server.app
        self.server.run(Scheduler(app[CONTEXT], app[PLATFORM]).publish())

    def cursor(self, path: str, query: dict[str, Any], auth: dict[str, str]) -> str | None:
        """A real cursor of the same list (same sort and filters: a cursor is bound to them),
        if it has a second page."""
        same = {k: v for k, v in query.items() if k not in ("cursor", "limit")}
        params = {**same, "limit": 1}
        resp = self.http.get(self.base + API + path, headers=auth, params=params, timeout=30)
        cursor = resp.json().get("next_cursor") if resp.status_code == 200 else None
        return str(cursor) if cursor else None


#: Every served app has an admin and lets webhooks target loopback.
COMMON = {
    "admin_email": ADMIN_EMAIL,
    "admin_password": PASSWORD,
    "webhook_allow_hosts": ["127.0.0.1"],
}


@contextmanager
def serving(settings: Settings) -> Iterator[Live]:
    """Serve the app with ``settings`` for the duration of the block."""
    server = LiveServer(settings)
    base = server.start()
    try:
        with requests.Session() as http:
            yield Live(server, base, http)
    finally:
        server.stop()


@pytest.fixture
def live(make_settings: Any) -> Iterator[Live]:
    """The app on loopback with limits high enough that fuzzing is not throttled into 429s,
    and webhook targets checked without DNS (:func:`offline_webhook_targets`)."""
    settings = make_settings(
        rate_limit="1000000/minute",
        login_max_failures=1_000_000,
        login_max_failures_per_address=1_000_000,
        **COMMON,
    )
    with offline_webhook_targets(), serving(settings) as live:
        yield live


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
    # No traceback leaks; the request id is the client's own ``X-Request-ID`` echoed when it
    # is sane (schemathesis once sent "Traceback" as one), so it is not the server's words.
    said = {k: v for k, v in body.items() if k != "request_id"}
    assert "Traceback" not in json.dumps(said), body
    return None


def _has_input(operation: Any) -> bool:
    """Whether anything can be made invalid: a body, a path or query parameter, or a header
    with constraints (bare operations have no negative cases)."""
    definition = operation.definition.raw
    return "requestBody" in definition or any(
        p["in"] != "header" or set(p["schema"]) - {"type"} for p in definition.get("parameters", [])
    )


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_operation_matches_document(live: Live, method: str, path: str) -> None:
    schema = schemathesis.openapi.from_url(
        f"{live.base}{API}/openapi.json", config=CONFIG, timeout=30
    )
    operation = schema[path][method]
    strategy = operation.as_strategy(GenerationMode.POSITIVE)
    if _has_input(operation):
        strategy = strategy | operation.as_strategy(GenerationMode.NEGATIVE)
    fuzz = Fuzz(live, ROUTE_OF[(method, path)].auth, operation.definition.raw["operationId"])

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy, data=st.data())
    def run(case: Case, data: st.DataObject) -> None:
        fuzz.example(case, data)

    with warnings.catch_warnings():
        # The app's thread (PyMongo, redis-py) uses the global `random` while Hypothesis draws,
        # which it would mistake for a strategy using `random`.
        warnings.filterwarnings(
            "ignore", message="Do not use the `random` module", category=HypothesisWarning
        )
        run()
    # The run must have reached the operation's success path, not only its refusals.
    sent = "\n".join(fuzz.log)
    assert any(200 <= s < 400 for s in fuzz.seen), f"{method} {path} never succeeded:\n{sent}"


class Fuzz:
    """One operation's examples: fill in real values, call, validate."""

    def __init__(self, live: Live, auth: str, op_id: str):
        self.live = live
        self.auth = auth
        self.op_id = op_id
        self.seen: set[int] = set()
        self.log: list[str] = []  # what each example sent and got, for a failure's message
        self.messages = 0  # real messages given so far (their states go in turn)

    def example(self, case: Case, data: st.DataObject) -> None:
        """Send one drawn case (twice when it repeats an Idempotency-Key) and validate."""
        headers = self._credentials(case, data)
        positive = case.meta is not None and case.meta.generation.mode.is_positive
        if positive:
            self._fill_in(case, data)
        if not positive and "Authorization" not in (case.headers or {}):
            # The negative case leaves out the required header on purpose: sending our
            # credentials would make it valid (CI: "schema-violating request accepted").
            headers.pop("Authorization", None)
        headers.update(self._resources(case, data, positive))
        if positive:
            self._cursor(case)
        repeat = False
        if positive and "Idempotency-Key" in (case.headers or {}):
            case.headers["Idempotency-Key"] = uuid.uuid4().hex
            repeat = data.draw(st.booleans(), "repeat with the same key")
        first = self._send(case, headers)
        if repeat:
            again = self._send(case, headers)
            if 200 <= first.status_code < 300:
                assert (again.status_code, again.content) == (first.status_code, first.content)
                assert again.headers.get("idempotent-replayed") == ["true"]

    def _send(self, case: Case, headers: dict[str, str]) -> Response:
        live = self.live
        response = case.call(base_url=live.base, session=live.http, headers=headers, timeout=30)
        self.seen.add(response.status_code)
        self.log.append(f"{response.status_code} {case.formatted_path} {case.query}"[:200])
        case.validate_response(
            response,
            additional_checks=[problem_details],
            headers=headers,
            transport_kwargs={"base_url": live.base, "session": live.http, "headers": headers},
        )
        return response

    def _credentials(self, case: Case, data: st.DataObject) -> dict[str, str]:
        if self.auth == "none":
            return {}
        choices = ["token", "token", "token", "none", "garbage"]
        if self.auth == "admin":
            choices.append("user")
        who = data.draw(st.sampled_from(choices), "credentials")
        if who == "none":
            if case.headers:
                case.headers.pop("Authorization", None)
            return {}
        if who == "garbage":
            return {"Authorization": "Bearer not-a-token"}
        if who == "user" or self.auth == "user":
            # Logging out ends the login: give it a login of its own.
            login = self.live.bearer(self.live.login()) if self.op_id == "logout" else None
            return login or dict(self.live.user)
        return dict(self.live.admin)

    def _fill_in(self, case: Case, data: st.DataObject) -> None:
        """What the schema cannot say, for valid cases: real credentials, a deliverable email,
        an allowed webhook target, a range of at most 366 days."""
        live, body = self.live, case.body
        if isinstance(body, dict):
            if self.op_id == "register":
                case.body = {**body, "email": f"{uuid.uuid4().hex[:10]}@example.com"}
                if _too_common(body.get("password")):  # a list no schema states
                    case.body["password"] = PASSWORD
            elif self.op_id == "create_webhook":
                case.body = {**body, "url": HOOK_URL}
            elif self.op_id == "login" and data.draw(st.booleans(), "real login"):
                case.body = {"email": live.email, "password": PASSWORD}
            elif self.op_id == "refresh" and data.draw(st.booleans(), "real refresh token"):
                case.body = {"refresh_token": live.login()["refresh_token"]}
            elif self.op_id == "bulk_tasks" and data.draw(st.booleans(), "real ids"):
                real = [live.new_task()[0] for _ in range(2)]
                case.body = {**body, "ids": real + list(body.get("ids", []))[:3]}
        if self.op_id == "put_share_weight":
            case.path_parameters = _weight_key(case.path_parameters or {})
        query = case.query or {}
        if self.op_id == "analytics_summary" and "from" in query and "to" in query:
            # At most 366 days, 'from' first: a rule across two parameters.
            start = date.fromisoformat(query["from"])
            days = data.draw(st.integers(0, min(365, (date.max - start).days)), "days")
            case.query = {**query, "to": (start + timedelta(days=days)).isoformat()}
        elif self.op_id == "analytics_summary" and "from" in query:
            days = data.draw(st.integers(0, 365), "days back")
            start = datetime.now(UTC).date() - timedelta(days=days)
            case.query = {**query, "from": start.isoformat()}

    def _cursor(self, case: Case) -> None:
        """A cursor is opaque and signed: a valid case gets a real one, or none."""
        query = case.query or {}
        if "cursor" not in query:
            return
        if self.op_id == "list_dead":
            # A dead-letter cursor also binds the filters and the state of the queue, which
            # other cases change under it; its paging is tested in tests/web/test_admin_queues.py.
            case.query = {k: v for k, v in query.items() if k != "cursor"}
            return
        auth = self.live.admin if self.auth == "admin" else self.live.user
        path = case.formatted_path.removeprefix(API)
        cursor = self.live.cursor(path, query, auth)
        if cursor is None:
            case.query = {k: v for k, v in query.items() if k != "cursor"}
        else:
            case.query = {**query, "cursor": cursor}

    def _resources(self, case: Case, data: st.DataObject, positive: bool) -> dict[str, str]:
        """Sometimes point the path at real resources; returns conditional headers to send
        (valid cases only: a drawn invalid one must reach the server as drawn)."""
        params = case.path_parameters or {}
        always = positive and self.op_id in ALWAYS_REAL
        if not params or not (always or data.draw(st.booleans(), "real resources")):
            return {}
        path, live = case.path, self.live
        headers: dict[str, str] = {}
        real: dict[str, str] = {}
        if path.startswith(f"{API}/tasks/"):
            task_id, etag = live.new_task()
            real["id"] = task_id
            for name in ("If-Match", "If-None-Match"):
                if positive and any(p.name == name for p in case.operation.iter_parameters()):
                    choice = data.draw(st.sampled_from(["drawn", "current", "*", "stale"]), name)
                    value = {"current": etag, "*": "*", "stale": f'"{task_id}.0"'}.get(choice)
                    if value is not None:
                        headers[name] = value
        elif path.startswith(f"{API}/notifications/"):
            real["id"] = live.new_notification()
        elif "delivery_id" in params:
            real["id"], real["delivery_id"] = live.new_delivery()
        elif path.startswith(f"{API}/webhooks/"):
            real["id"] = live.new_webhook()
        elif self.op_id in MESSAGE_STATES:
            # In turn, not drawn: with a few dozen examples a draw would leave one state out.
            states = MESSAGE_STATES[self.op_id]
            state = states[self.messages % len(states)]
            self.messages += 1
            queue, real["id"] = live.new_message(state)
            if "queue" in params:
                real["queue"] = queue
        elif path.startswith(f"{API}/admin/queues/"):
            real["queue"] = data.draw(st.sampled_from(live.names("/admin/queues", "queue")))
        elif path.startswith(f"{API}/admin/backups/"):
            real["id"] = live.backup()
        elif path.startswith(f"{API}/admin/schedules/"):
            real["name"] = data.draw(st.sampled_from(live.names("/admin/schedules", "name")))
        elif path.startswith(f"{API}/admin/share-weights/"):
            real["key"] = live.new_share_weight()
        elif "user_id" in params:
            real["user_id"] = live.victim()
        case.path_parameters = {**params, **real}
        return headers


def _weight_key(params: dict[str, Any]) -> dict[str, Any]:
    """A weight key is a user id, role:<role> or default (config.settings.WEIGHT_KEY): a drawn
    key that is none of those is 422, so a valid case gets a key of its own instead."""
    key = params.get("key")
    if isinstance(key, str) and WEIGHT_KEY.fullmatch(key):
        return params
    return {**params, "key": f"fuzz-{uuid.uuid4().hex[:12]}"}


@pytest.mark.timeout(120)
def test_refusals_the_fuzzer_cannot_reach_match_document(make_settings: Any) -> None:
    """Too large a body (413), the rate limit and the sign-in throttle (429), a duplicate
    account (409): answered as documented, headers included."""
    settings = make_settings(
        rate_limit="10/minute", max_body_size=1024, login_max_failures=2, **COMMON
    )
    with serving(settings) as live:
        schema = schemathesis.openapi.from_url(
            f"{live.base}{API}/openapi.json", config=CONFIG, timeout=30
        )

        def answer(method: str, path: str, **parts: Any) -> int:
            case = schema[API + path][method].Case(**parts)
            response = case.call(base_url=live.base, session=live.http, timeout=30)
            # ignored_auth probes without credentials: here that spends the address's budget.
            case.validate_response(
                response, additional_checks=[problem_details], excluded_checks=[ignored_auth]
            )
            return response.status_code

        big = {"title": "big", "description": "x" * 2048}
        assert answer("POST", "/tasks", headers=live.user, body=big) == 413
        taken = {**live.credentials(), "email": live.email}
        assert answer("POST", "/auth/register", body=taken) == 409
        wrong = {"email": live.email, "password": "not the password"}
        assert [answer("POST", "/auth/login", body=wrong) for _ in range(3)] == [401, 401, 429]
        statuses = [answer("GET", "/me", headers=live.user) for _ in range(12)]
        assert statuses[0] == 200 and statuses[-1] == 429, statuses


def test_edge_values_are_refused_as_documented(live: Live) -> None:
    """Values a fuzzer seldom draws: dates that leave years 1-9999 once in UTC, and null
    where a bulk change needs a value. Each is a documented 422, not a 500."""
    schema = schemathesis.openapi.from_url(
        f"{live.base}{API}/openapi.json", config=CONFIG, timeout=30
    )
    task_id, _ = live.new_task()

    def answer(method: str, path: str, **parts: Any) -> int:
        case = schema[API + path][method].Case(**parts)
        response = case.call(base_url=live.base, session=live.http, timeout=30)
        case.validate_response(response, additional_checks=[problem_details])
        return response.status_code

    for when in ("0001-01-01T00:30:00+01:00", "9999-12-31T23:30:00-01:00"):
        body = {"title": "edge", "due_at": when}
        assert answer("POST", "/tasks", headers=live.user, body=body) == 422
        patch = {"due_at": when}
        assert (
            answer(
                "PATCH",
                "/tasks/{id}",
                headers=live.user,
                body=patch,
                path_parameters={"id": task_id},
            )
            == 422
        )
        assert answer("GET", "/tasks", headers=live.user, query={"due_before": when}) == 422
    for field in ("status", "priority", "tags"):
        body = {"ids": [task_id], "set": {field: None}}
        assert answer("POST", "/tasks/bulk", headers=live.user, body=body) == 422
    assert live.call("GET", f"/tasks/{task_id}", live.user)["status"] == "todo"


# --- The whole run: every phase, every check -------------------------------------------------

#: Statuses a schema-valid request may still get for the state it meets, besides schemathesis'
#: defaults (2xx, 3xx, 401, 403, 404, 409, 429): 412 where If-Match is honoured (a current ETag
#: cannot be drawn; RFC 9110 says a stale or weak one fails the precondition).
ENGINE_CONFIG = {
    "seed": 20240607,
    "workers": 1,
    "request-timeout": 30,
    "continue-on-failure": True,
    "checks": {"enabled": True},
    "generation": {"max-examples": 8, "deterministic": True},
    "phases": {"stateful": {"max-steps": 6}},
    "operations": [
        {
            "include-operation-id": ["patch_task", "delete_task"],
            "checks": {
                "positive_data_acceptance": {
                    "expected-statuses": ["2xx", "3xx", "401", "403", "404", "409", "412", "429"]
                }
            },
        }
    ],
}


class FillIn:
    """What a JSON schema cannot say, put into valid (positive) requests just before they are
    sent; schemathesis then re-checks that each is still valid. Negative requests go as drawn.

    - a cursor is signed: a drawn one is forged, so a real cursor of the same list (or none);
    - ``from``/``to`` of the analytics summary: at most 366 days, ``from`` first (a rule across
      two parameters);
    - a webhook target must resolve to an allowed address: the drawn URL is sent to loopback;
    - a new account needs an address nobody has and a password not among the commonest;
    - an Idempotency-Key already used with another body is refused (422): a fresh key;
    - revoking every login of the fuzzing user (or admin) would end the run: another user's;
    - a weight key must be a user id, ``role:<role>`` or ``default``: a fresh key otherwise;
    - schemathesis 4.32's coverage phase draws header values from ``[A-Za-z0-9]`` only, so for a
      header whose pattern needs other characters (If-Match's quotes) it labels a value that
      breaks the pattern as valid; such a header is left out.
    """

    def __init__(self, live: Live):
        self.live = live

    def __call__(self, context: Any, case: Case, kwargs: dict[str, Any]) -> None:
        if case.meta is None or not case.meta.generation.mode.is_positive:
            return
        op_id = case.operation.definition.raw["operationId"]
        self._headers(case)
        body = case.body
        if op_id == "register" and isinstance(body, dict):
            case.body = {
                **body,
                "email": f"{uuid.uuid4().hex[:12]}@example.com",
                "password": f"fuzz {uuid.uuid4().hex}",
            }
        elif (
            op_id == "create_webhook"
            and isinstance(body, dict)
            and isinstance(body.get("url"), str)
        ):
            parts = urlsplit(body["url"])
            case.body = {**body, "url": urlunsplit(("http", "127.0.0.1:9", *parts[2:4], ""))}
        elif op_id == "revoke_sessions":
            params = case.path_parameters or {}
            if params.get("user_id") in (self.live.user_id, self.live.admin_id):
                case.path_parameters = {**params, "user_id": self.live.victim()}
        elif op_id == "put_share_weight":
            case.path_parameters = _weight_key(case.path_parameters or {})
        query = case.query or {}
        if op_id == "analytics_summary":
            case.query = self._range(query)
        if query.get("cursor"):
            self._cursor(case, op_id)

    def _headers(self, case: Case) -> None:
        headers = case.headers or {}
        if "Idempotency-Key" in headers:
            case.headers = {**headers, "Idempotency-Key": uuid.uuid4().hex}
        for param in case.operation.iter_parameters():
            value = headers.get(param.name)
            pattern = param.definition.get("schema", {}).get("pattern")
            drawn_wrong = isinstance(value, str) and pattern and not re.search(pattern, value)
            if param.location == "header" and drawn_wrong:
                case.headers = {k: v for k, v in (case.headers or {}).items() if k != param.name}

    def _range(self, query: dict[str, Any]) -> dict[str, Any]:
        today = datetime.now(UTC).date()
        if "from" in query and "to" in query:
            start = date.fromisoformat(query["from"])
            days = int(uuid.uuid4().int % 366)
            end = start + timedelta(days=min(days, (date.max - start).days))
            return {**query, "to": end.isoformat()}
        if "from" in query:
            return {**query, "from": (today - timedelta(days=uuid.uuid4().int % 366)).isoformat()}
        return query

    def _cursor(self, case: Case, op_id: str) -> None:
        """Keep a cursor the list accepts (one a link handed on), else use a real one."""
        live, query = self.live, dict(case.query or {})
        auth = live.admin if ROUTE_BY_ID[op_id].auth == "admin" else live.user
        url = live.base + case.formatted_path
        probe = live.http.get(url, params=query, headers=auth, timeout=30)
        if probe.status_code == 200:
            return
        first = {**{k: v for k, v in query.items() if k != "cursor"}, "limit": 1}
        page = live.http.get(url, params=first, headers=auth, timeout=30)
        cursor = page.json().get("next_cursor") if page.status_code == 200 else None
        query.pop("cursor")
        case.query = {**query, "cursor": cursor} if cursor else query


ROUTE_BY_ID = {route.operation_id: route for route in ROUTES}


@schemathesis.check
def answers_problem_details(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """The engine's run of :func:`problem_details`."""
    return problem_details(ctx, response, case)


@contextmanager
def offline_webhook_targets() -> Iterator[None]:
    """Webhook targets are checked without DNS: a name resolves to nothing (refused), so no
    drawn host name leaves the machine; loopback literals stay allowed by the allow list."""
    from core import ssrf

    async def no_dns(host: str, port: int) -> list[tuple[int, str]]:
        raise OSError(f"no DNS in tests ({host})")

    real = ssrf.check_target

    async def check_target(url: str, allow_hosts: list[str], **kwargs: Any) -> Any:
        kwargs["resolve"] = no_dns
        return await real(url, allow_hosts, **kwargs)

    ssrf.check_target = check_target  # type: ignore[assignment]
    try:
        yield
    finally:
        ssrf.check_target = real  # type: ignore[assignment]


@pytest.mark.timeout(900)
def test_schemathesis_run_with_every_check_finds_nothing(live: Live) -> None:
    """What ``st run --checks all`` does, in the suite: the examples, coverage, fuzzing and
    stateful phases (the document's links hand ids, ETags and cursors from one call to the
    next) over every operation, each answer held to every built-in check and to RFC 9457.
    A failure prints schemathesis' report of it, with a curl command to replay it."""
    schema = schemathesis.openapi.from_url(
        f"{live.base}{API}/openapi.json",
        config=schemathesis.Config.from_dict(ENGINE_CONFIG),
        timeout=30,
    )
    # Every operation, except the one serving the document itself, which schemathesis skips.
    assert {op.definition.raw["operationId"] for op in _operations(schema)} == set(ROUTE_BY_ID) - {
        "openapi"
    }

    @schema.auth(refresh_interval=None)
    class Tokens:
        def get(self, case: Case, ctx: Any) -> str | None:
            route = ROUTE_BY_ID[case.operation.definition.raw["operationId"]]
            if route.auth == "none":
                return None
            if route.operation_id == "logout":  # ends the login it is sent with
                return str(live.login()["access_token"])
            return (live.admin if route.auth == "admin" else live.user)["Authorization"][7:]

        def set(self, case: Case, data: str, ctx: Any) -> None:
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}

    fill_in = schemathesis.hook("before_call")(FillIn(live))
    failures: list[str] = []
    phases: set[str] = set()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="Do not use the `random` module", category=HypothesisWarning
            )
            for event in schemathesis.engine.from_schema(schema).execute():
                failures.extend(_failures_of(event))
                if isinstance(event, PhaseFinished) and event.status != Status.SKIP:
                    phases.add(event.phase.name.value)
    finally:
        schemathesis.hooks.unregister(fill_in)
    assert not failures, "\n\n".join(failures)
    # The document has no examples, so that phase has nothing to do; the others must run.
    assert {"coverage", "fuzzing", "stateful"} <= phases, phases


def _operations(schema: Any) -> list[Any]:
    return [result.ok() for result in schema.get_all_operations()]


def _failures_of(event: Any) -> list[str]:
    """Readable reports of what an engine event says went wrong (nothing for the rest)."""
    out: list[str] = []
    if isinstance(event, events.ScenarioFinished) and event.status in (
        Status.FAILURE,
        Status.ERROR,
    ):
        recorder = event.recorder
        for case_id, checks in recorder.checks.items():
            for check in checks:
                if check.failure_info is None:
                    continue
                failure = check.failure_info.failure
                interaction = recorder.interactions.get(case_id)
                answer = interaction.response if interaction is not None else None
                got = (
                    f"{answer.status_code} {answer.content[:300]!r}" if answer is not None else "-"
                )
                out.append(
                    f"{recorder.label} [{event.phase.value}] {check.name}: {failure.title}\n"
                    f"{failure.message}\nanswer: {got}\n"
                    f"{recorder.cases[case_id].value.as_curl_command()}"
                )
        if not out:
            out.append(f"{recorder.label} [{event.phase.value}]: {event.status.value}")
    elif isinstance(event, events.NonFatalError | events.FatalError):
        out.append(f"{type(event).__name__}: {getattr(event, 'info', event)}")
    elif isinstance(event, events.EngineFinished):
        out.extend(f"{f.title}: {f.message}" for f in event.failures)
    return out
