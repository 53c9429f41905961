"""Issue 7, "Parallel logins starve everything": password hashing has a bounded pool.

Before: every login ran argon2 on the shared default executor, so 100 parallel logins took
every core and an unrelated cached read went from 3 ms to 1.5 s. Now at most a few hashes run
(core.security.HashPool) and a burst beyond the pool and its short queue is answered 503 with
Retry-After at once. The tests hold the hashing threads on a gate instead of timing real
argon2: what is asserted (who waits, who is refused, who still answers) does not depend on how
loaded the machine is.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from core import security
from core.errors import Overloaded
from tests.conftest import bearer, register

pytestmark = pytest.mark.timeout(90)

EMAIL = "busy@example.com"
SECRET = "busy person's passphrase"


class GatedHasher:
    """The real hasher, whose calls wait for ``gate`` and are counted while they run."""

    def __init__(self, gate: threading.Event):
        self.gate = gate
        self.real = security._hasher
        self.running = 0
        self.most_running = 0
        self._lock = threading.Lock()

    def _enter(self) -> None:
        with self._lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        self.gate.wait(60)

    def _leave(self) -> None:
        with self._lock:
            self.running -= 1

    def verify(self, stored: str, password: str) -> bool:
        self._enter()
        try:
            return bool(self.real.verify(stored, password))
        finally:
            self._leave()

    def hash(self, password: str) -> str:
        self._enter()
        try:
            return str(self.real.hash(password))
        finally:
            self._leave()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()  # never leave a hashing thread waiting


async def _until(condition: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def test_the_default_pool_is_about_the_number_of_cores() -> None:
    cores = security.usable_cores()
    assert security.hash_pool.workers == cores
    assert security.hash_pool.queue == 2 * cores


async def test_the_pool_runs_at_most_its_workers_and_refuses_beyond_its_queue(
    gate: threading.Event,
) -> None:
    pool = security.HashPool(workers=2, queue=1)
    running = 0
    most = 0
    lock = threading.Lock()

    def work(n: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        gate.wait(60)
        with lock:
            running -= 1
        return n

    admitted = [asyncio.create_task(pool.run(work, n)) for n in range(3)]
    await _until(lambda: pool.admitted == 3)
    # Full: the next call is refused at once, without waiting for the pool.
    with pytest.raises(Overloaded) as refused:
        await pool.run(work, 99)
    assert refused.value.status == 503
    assert refused.value.headers["Retry-After"] == "1"
    gate.set()
    assert sorted(await asyncio.gather(*admitted)) == [0, 1, 2]
    assert most == 2
    assert pool.admitted == 0
    assert await pool.run(work, 7) == 7  # room again


async def test_a_cancelled_caller_keeps_its_slot_until_the_hash_ends(
    gate: threading.Event,
) -> None:
    pool = security.HashPool(workers=1, queue=0)
    task = asyncio.create_task(pool.run(gate.wait, 60))
    await _until(lambda: pool.admitted == 1)
    task.cancel()
    await asyncio.sleep(0.05)
    # The thread is still hashing: the slot is not handed out twice.
    with pytest.raises(Overloaded):
        await pool.run(gate.wait, 60)
    gate.set()
    await _until(lambda: pool.admitted == 0)


async def test_parallel_logins_beyond_the_pool_get_503_at_once_and_reads_still_answer(
    client: Any, gate: threading.Event, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = (await register(client, EMAIL, password=SECRET))["access_token"]
    assert (await client.get("/api/v1/tasks/stats", headers=bearer(token))).status == 200
    pool = security.HashPool(workers=1, queue=1)
    hasher = GatedHasher(gate)
    monkeypatch.setattr(security, "hash_pool", pool)
    monkeypatch.setattr(security, "_hasher", hasher)

    async def login() -> tuple[int, dict[str, str], Any]:
        resp = await client.post("/api/v1/auth/login", json={"email": EMAIL, "password": SECRET})
        return resp.status, dict(resp.headers), await resp.json()

    tasks = [asyncio.create_task(login()) for _ in range(10)]
    # Eight are answered while the two admitted ones are still held on the gate: at once.
    await _until(lambda: sum(t.done() for t in tasks) == 8)
    assert not gate.is_set()
    assert pool.admitted == 2
    refused = [t.result() for t in tasks if t.done()]
    for status, headers, problem in refused:
        assert status == 503
        assert headers["Retry-After"] == "1"
        assert headers["Content-Type"].startswith("application/problem+json")
        assert problem["status"] == 503
        assert "retry" in problem["detail"].lower()
    # An unrelated (cached) read is served while the hashing pool is full.
    resp = await client.get("/api/v1/tasks/stats", headers=bearer(token))
    assert resp.status == 200
    # Registration hashes on the same pool.
    resp = await client.post(
        "/api/v1/auth/register",
        json={"email": "later@example.com", "password": "a fine passphrase", "name": "L"},
    )
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "1"
    gate.set()
    admitted = await asyncio.gather(*[t for t in tasks if not t.done()])
    assert [status for status, _, _ in admitted] == [200, 200]
    assert hasher.most_running == 1


async def test_unknown_accounts_still_cost_one_verification_through_the_pool(
    client: Any, gate: threading.Event, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dummy-hash verification for an unknown email goes through the pool too, so a full
    pool answers known and unknown accounts alike."""
    await register(client, EMAIL, password=SECRET)
    pool = security.HashPool(workers=1, queue=0)
    monkeypatch.setattr(security, "hash_pool", pool)
    monkeypatch.setattr(security, "_hasher", GatedHasher(gate))

    async def login(email: str) -> int:
        resp = await client.post("/api/v1/auth/login", json={"email": email, "password": "x"})
        return int(resp.status)

    held = asyncio.create_task(login("ghost@example.com"))
    await _until(lambda: pool.admitted == 1)
    assert [await login(email) for email in (EMAIL, "ghost2@example.com")] == [503, 503]
    gate.set()
    assert await held == 401
