"""The outbox relay: moves events recorded with writes to the broker.

Events are claimed in batches with a lease (so several relays — one per web replica — share
the work without blocking each other, and a relay that dies mid-batch loses nothing: its lease
expires and another takes over), enqueued through Dramatiq's synchronous ``send`` on a thread
(never on the event loop), then marked dispatched. Delivery is at least once; actors dedupe.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from datetime import timedelta
from typing import Any

import dramatiq
from pymongo.errors import PyMongoError

from config.logging import get_logger
from core.context import Context
from core.events import public_event
from core.store import Doc, utcnow
from workers.routing import actors_for

log = get_logger(__name__)


class Relay:
    """Drains the outbox into the broker."""

    def __init__(
        self,
        ctx: Context,
        broker: dramatiq.Broker,
        *,
        batch_size: int = 200,
        poll_interval: float = 1.0,
        lease_seconds: float = 30.0,
        max_backoff: float = 4.0,
    ):
        self.ctx = ctx
        self.broker = broker
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.lease = timedelta(seconds=lease_seconds)
        #: While the broker is down the relay retries with backoff up to this many seconds, so
        #: side effects resume within that long after it returns.
        self.max_backoff = max_backoff
        self.wake = asyncio.Event()
        self.relayed = 0

    async def run(self) -> None:
        """Drain forever: immediately when woken, else every ``poll_interval`` seconds."""
        failures = 0
        while True:
            # Cleared before draining, so a write that lands during the drain wakes the next
            # round at once instead of waiting for the poll.
            self.wake.clear()
            try:
                moved = await self.drain_once()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception:
                failures += 1
                moved = 0
                log.exception("relay.error", failures=failures)
            if moved >= self.batch_size:
                continue
            backoff = min(self.max_backoff, 0.25 * 2**failures)
            delay = backoff if failures else self.poll_interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), delay)

    async def drain_once(self) -> int:
        """Claim, enqueue and mark one batch; returns how many events it moved."""
        events = self.ctx.store["events"]
        now = utcnow()
        free = {"pending": True, "$or": [{"lease_until": None}, {"lease_until": {"$lt": now}}]}
        candidates = (
            await events.find(free, {"_id": 1}).sort("_id", 1).limit(self.batch_size).to_list()
        )
        if not candidates:
            return 0
        token = secrets.token_hex(8)
        await events.update_many(
            {"_id": {"$in": [c["_id"] for c in candidates]}, **free},
            {"$set": {"lease_until": now + self.lease, "lease_owner": token}},
        )
        claimed = (
            await events.find({"lease_owner": token, "pending": True}).sort("_id", 1).to_list()
        )
        if not claimed:
            return 0
        try:
            await asyncio.to_thread(self._enqueue, claimed)
        except Exception:
            # The broker is down: give the batch back now, so the next round (within
            # max_backoff of the broker's return) retries it instead of waiting out the lease.
            # Messages sent before the failure go again then; actors dedupe.
            with contextlib.suppress(PyMongoError):
                await events.update_many(
                    {"lease_owner": token, "pending": True},
                    {"$unset": {"lease_until": "", "lease_owner": ""}},
                )
            raise
        await events.update_many(
            {"_id": {"$in": [e["_id"] for e in claimed]}, "lease_owner": token},
            {
                "$unset": {"pending": "", "lease_until": "", "lease_owner": ""},
                "$set": {"dispatched_at": utcnow()},
            },
        )
        self.relayed += len(claimed)
        return len(claimed)

    def _enqueue(self, claimed: list[Doc]) -> None:
        for event in claimed:
            payload: dict[str, Any] = public_event(event)
            for name in actors_for(event["type"]):
                self.broker.get_actor(name).send(payload)
