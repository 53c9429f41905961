"""Issue 7: SIGTERM while clients send POSTs over keep-alive connections loses no answer.

Before the fix ``taskmanager web`` closed idle keep-alive connections the moment SIGTERM
arrived, while requests were arriving on them: the client saw "server disconnected" and could
not know whether its POST had been applied. Now the process stops accepting, answers what
arrives on open connections with ``Connection: close``, then closes: every request that was
sent gets an answer, and a request that got none was never sent (the connection was refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from pymongo import MongoClient

from cli.embedded import free_port
from tests.e2e.helpers import deployed_env, start, wait_http

pytestmark = pytest.mark.timeout(120)

SECRET = "shutdown-secret-" + "k" * 30
CLIENTS = 10


@dataclass
class Outcomes:
    """What the clients saw."""

    created: list[str] = field(default_factory=list)
    close_headers: int = 0
    refused: int = 0
    lost: list[str] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)


async def _client(base: str, token: str, out: Outcomes, stop: asyncio.Event) -> None:
    """POST tasks over one keep-alive connection (reopened after a ``Connection: close``)
    until the server refuses connections."""
    connector = aiohttp.TCPConnector(limit=1, force_close=False)
    async with aiohttp.ClientSession(
        base_url=base,
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=20),
        headers={"Authorization": f"Bearer {token}"},
    ) as http:
        while True:
            title = f"t-{uuid.uuid4().hex}"
            try:
                async with http.post("/api/v1/tasks", json={"title": title}) as resp:
                    await resp.read()
                    out.statuses.append(resp.status)
                    if resp.status == 201:
                        out.created.append(title)
                    if resp.headers.get("Connection", "").lower() == "close":
                        out.close_headers += 1
            except aiohttp.ClientConnectorError:
                out.refused += 1  # never sent: nothing to wonder about
                if stop.is_set():
                    return
            except (aiohttp.ClientError, TimeoutError) as exc:
                out.lost.append(f"{title}: {exc!r}")
                if stop.is_set() and len(out.lost) > 20:
                    return
            # Short idle gaps, so some connections are idle when the signal arrives.
            await asyncio.sleep(random.uniform(0, 0.02))


async def test_sigterm_answers_every_request_sent_on_keep_alive(
    make_settings: Any, tmp_path: Any
) -> None:
    settings = make_settings()
    env = deployed_env(settings, JWT_SECRET=SECRET, RATE_LIMIT="100000/minute")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    web = start(["web", "--port", str(port)], env, cwd=str(tmp_path))
    try:
        await wait_http(web, f"{base}/readyz")
        async with aiohttp.ClientSession(base_url=base) as http:
            resp = await http.post(
                "/api/v1/auth/register",
                json={
                    "email": f"s-{uuid.uuid4().hex[:8]}@example.com",
                    "password": "correct horse 1",
                    "name": "Sam",
                },
            )
            assert resp.status == 201, await resp.text()
            token = (await resp.json())["access_token"]

        out = Outcomes()
        stop = asyncio.Event()
        clients = [asyncio.create_task(_client(base, token, out, stop)) for _ in range(CLIENTS)]
        await asyncio.sleep(1.5)  # traffic flowing on every connection
        assert len(out.created) > CLIENTS, out
        signalled = time.monotonic()
        stop.set()
        web.popen.send_signal(signal.SIGTERM)
        try:
            done, _ = await asyncio.wait(clients, timeout=30)
            assert len(done) == CLIENTS, "clients still running 30 s after SIGTERM"
        finally:
            for task in clients:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        code = await asyncio.to_thread(web.popen.wait, 30)
        assert code == 0, web.describe()
        assert time.monotonic() - signalled < 30

        assert not out.lost, f"requests sent but never answered: {out.lost[:5]}"
        assert set(out.statuses) == {201}, out.statuses
        assert out.close_headers >= 1  # connections open at SIGTERM were told to close
        # Exactly what the clients were told was created exists: nothing is in doubt.
        with MongoClient(settings.mongodb_url, serverSelectionTimeoutMS=5000) as mongo:
            stored = {
                d["title"] for d in mongo[settings.mongodb_db]["tasks"].find({}, {"title": 1})
            }
        assert stored == set(out.created)
    finally:
        web.close()
