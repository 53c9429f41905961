"""Real ``taskmanager worker`` processes: a worker killed with SIGKILL mid-message has the
message redelivered within 15 s (once); a worker given SIGTERM finishes its in-flight message
and puts the prefetched one back on the queue.

The slow message is a real one: the welcome email, sent to an SMTP server that holds its
first ``MAIL FROM`` until the test releases it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis

from cli.embedded import free_port
from config.settings import Settings
from tests.conftest import SmtpSink, register, serving
from tests.e2e.helpers import Proc, process_env, start
from web.app import create_app
from web.keys import CONTEXT, PLATFORM
from workers.registry import WorkerInfo, list_workers

pytestmark = pytest.mark.timeout(120)

#: The promise under test: a killed worker's messages are redelivered within this (seconds).
RECOVERY_DEADLINE = 15.0


@dataclass
class StallingSink(SmtpSink):
    """An SMTP sink whose first ``MAIL FROM`` is answered only once ``release`` is set."""

    stalled: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    mails: int = 0

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self.mails += 1
        if self.mails == 1:
            self.stalled.set()
            while not self.release.is_set():
                await asyncio.sleep(0.05)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"


@pytest.fixture
def sink() -> Iterator[StallingSink]:
    with serving(StallingSink(free_port())) as s:
        try:
            yield s
        finally:
            s.release.set()


async def poll(check: Callable[[], Any], *, timeout: float, what: str, procs: list[Proc]) -> Any:
    """Run ``check`` on a thread until it returns something truthy; fail with process logs."""
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(check)
        if value:
            return value
        if time.monotonic() > deadline:
            logs = "\n".join(p.describe() for p in procs)
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}\n{logs}")
        await asyncio.sleep(0.1)


def worker_env(settings: Settings) -> dict[str, str]:
    return process_env(
        settings, APP_ENV="test", SMTP_URL=settings.smtp_url or "", LOG_FORMAT="json"
    )


class Workers:
    """Starts ``taskmanager worker`` processes and finds their registrations."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.procs: list[Proc] = []
        self.redis = redis.Redis.from_url(settings.redis_url or "")

    def start(self, *args: str, **env: str) -> Proc:
        """``taskmanager worker --processes 1 --threads 1 [args]``, with ``env`` added."""
        proc = start(
            ["worker", "--processes", "1", "--threads", "1", *args],
            {**worker_env(self.settings), **env},
        )
        self.procs.append(proc)
        return proc

    def registered(self, proc: Proc) -> WorkerInfo | None:
        children = set(proc.children())
        found = [
            w for w in list_workers(self.redis, self.settings.redis_prefix) if w.pid in children
        ]
        return found[0] if found else None

    def close(self) -> None:
        for proc in self.procs:
            for pid in proc.children():
                os.kill(pid, signal.SIGKILL)
            proc.close()
        self.redis.close()


@pytest.fixture
def workers_of(make_settings: Any) -> Iterator[Callable[[Settings], Workers]]:
    made: list[Workers] = []

    def make(settings: Settings) -> Workers:
        made.append(Workers(settings))
        return made[-1]

    yield make
    for w in made:
        w.close()


@dataclass
class Scene:
    """The app (for registrations and the queue inspector) and its worker processes, one of
    them started and stalled on a welcome email."""

    app: Any
    client: Any
    workers: Workers
    proc: Proc
    pair: dict[str, Any]
    email: str

    @property
    def queue(self) -> str:
        return str(self.app[PLATFORM].actors["send_welcome_email"].queue_name)


@pytest.fixture
async def scene(
    make_settings: Any,
    aiohttp_client: Any,
    sink: StallingSink,
    workers_of: Callable[[Settings], Workers],
) -> Scene:
    settings = make_settings(smtp_url=sink.url)
    app = create_app(settings)
    client = await aiohttp_client(app)
    workers = workers_of(settings)
    proc = workers.start()
    await poll(lambda: workers.registered(proc), timeout=30, what="the worker", procs=[proc])
    email = f"first-{uuid.uuid4().hex[:8]}@example.com"
    pair = await register(client, email)
    await poll(sink.stalled.is_set, timeout=20, what="the email to start", procs=[proc])
    return Scene(app, client, workers, proc, pair, email)


async def test_sigkill_mid_message_is_redelivered_once_within_15s(
    scene: Scene, sink: StallingSink
) -> None:
    app, workers, first, pair, email = scene.app, scene.workers, scene.proc, scene.pair, scene.email
    inspector, queue = app[PLATFORM].inspector, scene.queue

    def in_progress() -> bool:
        return any(s.queue == queue and s.in_progress == 1 for s in inspector.stats())

    assert await asyncio.to_thread(in_progress)
    victims = [*first.children(), first.pid]
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    assert first.popen.wait(10) == -signal.SIGKILL
    assert sink.messages == []

    second = workers.start()
    remaining = RECOVERY_DEADLINE - (time.monotonic() - killed_at)
    [message] = await sink.wait_for(1, timeout=remaining)
    assert message["To"] == email
    assert time.monotonic() - killed_at <= RECOVERY_DEADLINE

    def drained() -> bool:
        return any(
            s.queue == queue and s.ready == 0 and s.in_progress == 0 for s in inspector.stats()
        )

    await poll(drained, timeout=20, what="the queue to drain", procs=[second])
    assert len(sink.messages) == 1
    sent = (
        await app[CONTEXT]
        .store["email_log"]
        .count_documents({"user_id": pair["user"]["id"], "status": "sent"})
    )
    assert sent == 1
    code, in_time = second.stop(signal.SIGTERM, grace=30)
    assert (code, in_time) == (0, True), second.describe()


async def test_sigterm_finishes_the_message_in_flight_and_requeues_prefetched(
    scene: Scene, sink: StallingSink
) -> None:
    app, workers, proc, first = scene.app, scene.workers, scene.proc, scene.email
    inspector, queue, client = app[PLATFORM].inspector, scene.queue, scene.client
    await register(client)  # a second welcome, prefetched by the busy worker (1 thread)

    def state(ready: int, in_progress: int) -> Callable[[], bool]:
        def check() -> bool:
            return any(
                (s.queue, s.ready, s.in_progress) == (queue, ready, in_progress)
                for s in inspector.stats()
            )

        return check

    await poll(state(0, 2), timeout=20, what="both messages fetched", procs=[proc])

    proc.popen.send_signal(signal.SIGTERM)

    def stopping() -> bool:
        info = workers.registered(proc)
        return info is not None and info.state == "stopping"

    await poll(stopping, timeout=20, what="the worker to drain", procs=[proc])
    # Draining: still running, the in-flight email not yet sent.
    assert proc.popen.poll() is None
    assert sink.messages == []

    sink.release.set()
    [message] = await sink.wait_for(1, timeout=20)
    assert message["To"] == first
    code = await asyncio.to_thread(proc.popen.wait, 30)
    assert code == 0, proc.describe()
    # The prefetched message went back to the queue, nothing is left in progress, and the
    # worker deregistered.
    assert await asyncio.to_thread(state(1, 0))
    assert len(sink.messages) == 1
    assert await asyncio.to_thread(list_workers, workers.redis, workers.settings.redis_prefix) == []
