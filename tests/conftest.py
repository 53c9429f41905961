"""Shared fixtures: a real MongoDB wire-protocol server, real Redis, real SMTP.

MongoDB: ``MONGODB_URL`` when set (e.g. the docker-compose service), else one SecantusDB
server for the session on a free port; every test gets a fresh database.
Redis: ``REDIS_URL`` when set, else the machine's on 6379, else a private ``redis-server`` on a
free port; every test gets its own key prefix and only its own keys are deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from typing import Any

import pytest
import redis
from aiosmtpd.controller import Controller
from dramatiq import Worker
from pymongo import MongoClient
from pymongo.errors import ServerSelectionTimeoutError

from cli.embedded import EmbeddedMongo, PrivateRedis, free_port, redis_answers
from config.settings import Settings

TEST_SECRET = "test-secret-" + "x" * 40


def _ours_unless(url: str | None, start: Callable[[], Any]) -> Iterator[str]:
    """``url`` when given, else the URL of a server of our own (``start()``), stopped after."""
    if url:
        yield url
        return
    server = start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mongo_url() -> Iterator[str]:
    """A MongoDB server for the session."""
    yield from _ours_unless(
        os.environ.get("MONGODB_URL"), lambda: EmbeddedMongo(":memory:").start()
    )


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis server for the session (never flushed: tests use their own prefixes): the
    machine's, or a private one when nothing answers there."""
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    yield from _ours_unless(url if redis_answers(url) else None, lambda: PrivateRedis().start())


@pytest.fixture(scope="session")
def rabbitmq_url() -> Iterator[str]:
    """A RabbitMQ virtual host of our own for the session (``RABBITMQ_URL`` to use another).

    The machine's RabbitMQ on 5672 is shared, so the suite never touches its default vhost.
    """
    if os.environ.get("RABBITMQ_URL"):
        yield os.environ["RABBITMQ_URL"]
        return
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        pytest.fail("rabbitmqctl not found: install rabbitmq-server or set RABBITMQ_URL")
    vhost = f"tm-test-{uuid.uuid4().hex[:8]}"
    subprocess.run([ctl, "add_vhost", vhost], check=True, capture_output=True, timeout=60)
    subprocess.run(
        [ctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    try:
        yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    finally:
        subprocess.run([ctl, "delete_vhost", vhost], capture_output=True, timeout=60)


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_kind(request: pytest.FixtureRequest) -> str:
    """Run a worker test once per real broker."""
    return str(request.param)


@pytest.fixture
def broker_settings(make_settings: Any, broker_kind: str, request: pytest.FixtureRequest) -> Any:
    """``make_settings`` with ``BROKER_URL`` set for :func:`broker_kind`."""

    def make(**overrides: Any) -> Settings:
        if broker_kind == "rabbitmq":
            overrides.setdefault("broker_url", request.getfixturevalue("rabbitmq_url"))
        return make_settings(**overrides)  # type: ignore[no-any-return]

    return make


@pytest.fixture
def make_settings(mongo_url: str, redis_url: str) -> Iterator[Any]:
    """Build test settings; each test gets a fresh database and Redis prefix (cleaned after)."""
    tag = uuid.uuid4().hex[:10]
    made: list[Settings] = []

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "app_env": "test",
            "mongodb_url": mongo_url,
            "mongodb_db": f"t_{tag}",
            "redis_url": redis_url,
            "redis_prefix": f"t{tag}:",
            "jwt_secret": TEST_SECRET,
            "log_format": "console",
        }
        values.update(overrides)
        settings = Settings(**values)
        made.append(settings)
        return settings

    yield make
    for settings in made:
        if settings.mongodb_url:
            # A private server the test already stopped has nothing left to clean.
            with (
                MongoClient(settings.mongodb_url, serverSelectionTimeoutMS=2000) as client,
                contextlib.suppress(ServerSelectionTimeoutError),
            ):
                client.drop_database(settings.mongodb_db)
        if settings.redis_url:
            r = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=1)
            try:
                keys = list(r.scan_iter(match=settings.redis_prefix + "*", count=1000))
                if keys:
                    r.delete(*keys)
            except redis.ConnectionError:
                pass  # a private server the test already stopped: nothing left to clean
            finally:
                r.close()


@pytest.fixture
def settings(make_settings: Any) -> Settings:
    """Default test settings."""
    return make_settings()


def service_vars(settings: Settings) -> dict[str, str]:
    """The environment variables that point a process at the test's MongoDB database, Redis
    prefix and JWT secret (those of ``settings``)."""
    assert settings.mongodb_url and settings.redis_url
    return {
        "MONGODB_URL": settings.mongodb_url,
        "MONGODB_DB": settings.mongodb_db,
        "REDIS_URL": settings.redis_url,
        "REDIS_PREFIX": settings.redis_prefix,
        "JWT_SECRET": settings.jwt_secret.get_secret_value(),
    }


@pytest.fixture
def cli_env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """The settings as environment variables, as ``taskmanager`` commands read them; the
    process-wide logging set-up a command makes is undone afterwards."""
    import structlog

    for name, value in {**service_vars(settings), "APP_ENV": "test"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LOG_FORMAT", "console")
    monkeypatch.delenv("BROKER_URL", raising=False)
    root = logging.getLogger()
    handlers, level, config = root.handlers[:], root.level, structlog.get_config()
    yield settings
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**config)
    logging.captureWarnings(False)


@dataclass
class SmtpSink:
    """A real SMTP server on loopback collecting every message it receives."""

    port: int
    messages: list[Message] = field(default_factory=list)
    arrived: threading.Condition = field(default_factory=threading.Condition)

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.arrived:
            self.messages.append(message_from_bytes(envelope.content))
            self.arrived.notify_all()
        return "250 OK"

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Message]:
        """Wait (without blocking the loop) until ``count`` messages arrived."""
        await eventually(lambda: len(self.messages) >= count, f"{count} emails", timeout=timeout)
        return list(self.messages)


@contextlib.contextmanager
def serving(sink: SmtpSink) -> Iterator[SmtpSink]:
    """Serve ``sink`` (an :class:`SmtpSink`, or a subclass) on its loopback port meanwhile."""
    controller = Controller(sink, hostname="127.0.0.1", port=sink.port)
    controller.start()
    try:
        yield sink
    finally:
        controller.stop()


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    """A running SMTP sink."""
    with serving(SmtpSink(free_port())) as sink:
        yield sink


@pytest.fixture
def platform(settings: Settings) -> Iterator[Any]:
    """The broker with every actor declared on it (:class:`workers.broker.Platform`), built
    as every process builds it; closed after the test."""
    from config.connections import Connections
    from workers.broker import build_broker

    made = build_broker(Connections(settings))
    yield made
    made.close()


@pytest.fixture
def brokers() -> Iterator[list[Any]]:
    """Brokers to close at the very end (list this fixture first, so it is torn down after the
    apps and workers): a Dramatiq broker never closes its Redis connections, and sockets left
    to the garbage collector warn in whichever test happens to collect them."""
    from dramatiq.brokers.redis import RedisBroker

    made: list[Any] = []
    yield made
    for broker in made:
        if isinstance(broker, RedisBroker):
            broker.client.connection_pool.disconnect()


@pytest.fixture
async def worker_for() -> AsyncIterator[Any]:
    """Start an in-process Dramatiq worker over an app's real broker (Redis or RabbitMQ)."""
    started: list[Worker] = []

    def start(app: Any) -> Worker:
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        from web.keys import PLATFORM

        if isinstance(app[PLATFORM].broker, RabbitmqBroker):
            # The session's vhost is shared by the RabbitMQ tests: drop what earlier ones left.
            app[PLATFORM].broker.flush_all()
        worker = Worker(app[PLATFORM].broker, worker_threads=2, worker_timeout=100)
        worker.start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        # Bounded: a worker whose Redis a fault test stopped sits in reconnect back-off.
        await asyncio.to_thread(worker.stop, 20_000)


@pytest.fixture
async def ctx(settings: Settings) -> AsyncIterator[Any]:
    """A :class:`core.context.Context` over the test database, with the declared indexes."""
    from config.connections import Connections
    from core.context import open_context

    async with open_context(settings, Connections(settings)) as ctx:
        await ctx.store.ensure_indexes()
        yield ctx


@pytest.fixture
async def app(settings: Settings) -> Any:
    """The application, as ``taskmanager web`` builds it."""
    from web.app import create_app

    return create_app(settings)


@pytest.fixture
async def client(app: Any, aiohttp_client: Any) -> Any:
    """An HTTP client for :func:`app` (the app is started: indexes, relay)."""
    return await aiohttp_client(app)


async def register(
    client: Any, email: str | None = None, password: str = "correct horse 1", name: str = "Ann"
) -> dict[str, Any]:
    """Register a user; returns the token-pair body."""
    email = email or f"{uuid.uuid4().hex[:8]}@example.com"
    resp = await client.post(
        "/api/v1/auth/register", json={"email": email, "password": password, "name": name}
    )
    assert resp.status == 201, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def eventually(
    check: Callable[[], Any],
    what: str = "the condition",
    *,
    timeout: float = 10.0,
    describe: Callable[[], str] | None = None,
) -> Any:
    """Call ``check()`` every 50 ms (awaiting its value when that is awaitable), without
    blocking the loop, until the value is truthy; return it. After ``timeout`` seconds fail,
    naming ``what`` and adding ``describe()`` (e.g. the output of the processes under test)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f"\n{describe()}" if describe is not None else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        await asyncio.sleep(0.05)


async def serve_http(aiohttp_server: Any, *routes: tuple[str, str, Any]) -> int:
    """Serve ``routes`` (method, path, handler) over HTTP on loopback for the test; returns the
    port."""
    from aiohttp import web

    app = web.Application()
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    return int((await aiohttp_server(app, host="127.0.0.1")).port)


async def redeliver_welcome(app: Any, user_id: str, times: int = 2) -> None:
    """Send ``user_id``'s registration event to the welcome actor again, ``times`` times, as
    an at-least-once broker may."""
    from web.keys import PLATFORM

    actor = app[PLATFORM].actors["send_welcome_email"]
    event = {
        "id": "x",
        "type": "user.registered",
        "user_id": user_id,
        "created_at": "2026-01-01T00:00:00Z",
    }
    for _ in range(times):
        await asyncio.to_thread(actor.send, event)


def signed(secret: str, headers: Mapping[str, str], body: bytes) -> bool:
    """Whether a webhook delivery (its headers and body) is signed with ``secret``, now."""
    from core import webhooks

    return webhooks.verify(
        secret, headers["X-Webhook-Timestamp"], body, headers["X-Webhook-Signature"]
    )


def bearer(token: str) -> dict[str, str]:
    """An Authorization header."""
    return {"Authorization": f"Bearer {token}"}


class MotoServer:
    """A real S3-protocol server on loopback: moto's server mode (``moto_server``), in a
    process of its own. Buckets are made per test; its state lives in its memory."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> MotoServer:
        import sys

        # Beside this interpreter (the venv's bin), else on PATH.
        beside = os.path.join(os.path.dirname(sys.executable), "moto_server")
        exe = beside if os.path.exists(beside) else shutil.which("moto_server") or "moto_server"
        self.proc = subprocess.Popen(
            [exe, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        import socket

        while time.monotonic() < deadline:
            with socket.socket() as sock, contextlib.suppress(OSError):
                sock.settimeout(0.2)
                sock.connect(("127.0.0.1", self.port))
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"moto_server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def bucket(self, name: str | None = None) -> str:
        """A new empty bucket (the test's own), named ``name`` or at random."""
        import boto3

        name = name or f"tm-{uuid.uuid4().hex[:12]}"
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing-secret",
        )
        client.create_bucket(Bucket=name)
        client.close()
        return name


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """One moto S3 server for the session."""
    server = MotoServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Credentials for the moto server, as boto3 reads them (``AWS_*``); nothing of the
    machine's own AWS configuration is read."""
    values = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "moto-secret-" + uuid.uuid4().hex,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    return values
