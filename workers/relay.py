"""The outbox relay: moves events recorded with writes to the broker.

Events are claimed in batches with a lease (several relays — one per web replica — share the
work; a relay that dies mid-batch loses nothing: its lease expires and another takes over),
sent through Dramatiq's synchronous API on a thread (never on the event loop), one message per
(event, actor), and settled one by one:

- sent: marked dispatched, even when a later event of the batch failed;
- failed (its payload cannot be built, validated or encoded: an unknown type, a missing or
  malformed field, a value JSON cannot hold; or the broker refused its message while other
  events went through): ``attempts`` is counted and it
  waits ``next_attempt_at`` (exponential backoff); after ``max_attempts`` it is set aside
  (``pending`` cleared, ``set_aside_at`` set), counted in ``taskmanager_outbox_set_aside_total``
  and left for ``taskmanager outbox replay``;
- broker outage (``outage_after`` sends in a row failed): the rest of the batch is released at
  once, attempts uncharged, and :meth:`Relay.run` backs off.

A dispatched event awaits one receipt per (event, actor) pair (``core/events.py``, receipts;
written by the workers' ``OutboxReceipts`` middleware). Every ``sweep_interval`` the relay also
sweeps: each awaited message not finished by its due time (sent, or last retried, more than
``OUTBOX_REDELIVER_AFTER_S`` before, past its retry's eta) is sent again, so a broker that lost
its memory delays side effects without dropping them.

Fair dispatch (``FAIR_SHARE``, on by default; ``core/fairness.py``): instead of the oldest
events whoever wrote them, each round claims events round-robin across the users with pending
events, each user within a window of events in flight (sent, side effects not all finished),
so one user's burst waits in the outbox rather than in front of everyone else in the broker,
and all users together within a budget of events in flight (``FAIR_SHARE_BUDGET``). While a
window or the budget holds events back the relay looks again every ``fair_poll`` seconds,
twice as long after each such round that sent nothing (up to ``poll_interval``): a round reads
every event in flight, and slow workers keep the windows full for seconds, so looking ten times
a second then only loads the store (0.75 of the test server's core in the pipeline benchmark's
capped step, with one worker held to 0.06 of a core).
The relay also keeps the per-user backlog gauge (``workers/backlog.py``) up to date.

Delivery is at least once; actors dedupe.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import dramatiq
from bson import ObjectId
from prometheus_client import Counter, Gauge
from pymongo.errors import PyMongoError

from config.logging import get_logger
from core import cancel, fairness
from core import events as outbox
from core.context import Context
from core.events import outbox_lag
from core.store import Doc, utcnow
from workers.backlog import publish_backlog
from workers.catalogue import CATALOGUE

log = get_logger(__name__)

SET_ASIDE_TOTAL = Counter(
    "taskmanager_outbox_set_aside", "Events the relay set aside after repeated send failures"
)
# Shared state, read by every relay: in a web group (web/group.py) the merge keeps the most
# recent reading among the live processes.
OUTBOX_EVENTS = Gauge(
    "taskmanager_outbox_events",
    "Events in the outbox (state: pending, set_aside)",
    ["state"],
    multiprocess_mode="livemostrecent",
)
RESENT_TOTAL = Counter(
    "taskmanager_outbox_resent",
    "Messages of outbox events sent again because they did not finish in time",
    ["actor"],
)
OUTBOX_OLDEST_AGE = Gauge(
    "taskmanager_outbox_oldest_pending_age_seconds",
    "Age of the oldest pending event (0 when none is pending)",
    multiprocess_mode="livemostrecent",
)
#: The longest error text stored on an event.
ERROR_CHARS = 500


@dataclass
class Outcome:
    """What sending one claimed batch did, filled in as the sends go."""

    sent: list[ObjectId] = field(default_factory=list)
    failed: dict[ObjectId, str] = field(default_factory=dict)
    #: The error that stopped the batch as a broker outage (the unsettled rest is released).
    outage: BaseException | None = None


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
        max_attempts: int = 5,
        retry_backoff: float = 1.0,
        max_retry_backoff: float = 60.0,
        outage_after: int = 3,
        lag_interval: float = 1.0,
        redeliver_after: float | None = None,
        sweep_interval: float | None = None,
        fair: bool | None = None,
        fair_poll: float = 0.1,
        backlog_interval: float = 5.0,
    ):
        self.ctx = ctx
        self.broker = broker
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.lease = timedelta(seconds=lease_seconds)
        #: While the broker is down the relay retries with backoff up to this many seconds, so
        #: side effects resume within that long after it returns.
        self.max_backoff = max_backoff
        #: An event that failed this many sends is set aside.
        self.max_attempts = max_attempts
        #: Wait after an event's n-th failure: ``retry_backoff * 2**(n-1)``, at most
        #: ``max_retry_backoff`` seconds.
        self.retry_backoff = retry_backoff
        self.max_retry_backoff = max_retry_backoff
        #: This many failed sends in a row (with none succeeding in between) is a broker outage.
        self.outage_after = outage_after
        #: The lag gauges are refreshed at most this often (seconds).
        self.lag_interval = lag_interval
        #: An awaited message not finished this long after it was sent (or after its last
        #: retry's eta) is sent again (``OUTBOX_REDELIVER_AFTER_S`` unless given).
        self.redeliver_after = timedelta(
            seconds=ctx.settings.outbox_redeliver_after_s
            if redeliver_after is None
            else redeliver_after
        )
        #: How often the sweep runs (seconds): a quarter of the bound, from 0.25 to 5 s.
        self.sweep_interval = (
            sweep_interval
            if sweep_interval is not None
            else max(0.25, min(5.0, self.redeliver_after.total_seconds() / 4))
        )
        #: Fair dispatch (``FAIR_SHARE`` unless given): windows per user, round-robin.
        self.fair = ctx.settings.fair_share if fair is None else fair
        self.windows = fairness.Windows.from_settings(ctx.settings)
        #: While a window holds events back, the next round comes within this many seconds.
        self.fair_poll = fair_poll
        #: The per-user backlog gauge is refreshed at most this often (seconds).
        self.backlog_interval = backlog_interval
        self._roles = fairness.Roles()
        self._stored = fairness.StoredWeights()
        self.view = fairness.PendingView()
        #: Events in flight per user, read every 0.5 s at most unless a window may be full.
        self.flights = fairness.FlightCounts()
        self._turn = 0
        #: Whether the last round left pending events behind a full window.
        self.held_back = False
        #: Rounds in a row held back without sending anything (each doubles the next wait).
        self.barren = 0
        self.wake = asyncio.Event()
        self._backlog_read_at = -float("inf")
        self._lag_read_at = -float("inf")
        self._swept_at = -float("inf")

    async def run(self) -> None:
        """Drain forever: immediately when woken, else every ``poll_interval`` seconds. The
        gauges are refreshed by a task of their own, so reading them (a pass over the pending
        events) never delays a round."""
        gauges = asyncio.create_task(self._keep_gauges(), name="outbox-gauges")
        try:
            await self._drain_forever()
        finally:
            await cancel.stop(gauges, 5)

    async def _keep_gauges(self) -> None:
        while True:
            await self.refresh_lag()
            await self.refresh_backlog()
            await cancel.pause(min(self.lag_interval, self.backlog_interval))

    async def _drain_forever(self) -> None:
        failures = 0
        while True:
            cancel.checkpoint()  # a stop PyMongo swallowed (core/cancel.py)
            # Cleared before draining, so a write that lands during the drain wakes the next
            # round at once instead of waiting for the poll.
            self.wake.clear()
            began = time.monotonic()
            try:
                moved = await self.drain_once()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception:
                failures += 1
                moved = 0
                log.exception("relay.error", failures=failures)
            await self._sweep_when_due()
            if moved >= self.batch_size:
                continue
            backoff = min(self.max_backoff, 0.25 * 2**failures)
            # Held back by full windows or budget: look again soon, but never spend more than
            # half the time (and the database's) on rounds that find them still full.
            took = time.monotonic() - began
            self.barren = self.barren + 1 if self.held_back and not moved else 0
            backoff_held = min(self.poll_interval, self.fair_poll * 2 ** min(self.barren, 8))
            idle = max(backoff_held, took) if self.held_back else self.poll_interval
            delay = backoff if failures else idle
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives as the wake is set, and this loop would outlive its application.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self.wake.wait()

    async def refresh_lag(self, *, force: bool = False) -> None:
        """Update the outbox gauges (at most every ``lag_interval`` seconds unless ``force``)."""
        if not force and time.monotonic() - self._lag_read_at < self.lag_interval:
            return
        self._lag_read_at = time.monotonic()
        try:
            lag = await outbox_lag(self.ctx, self._known_pending())
        except PyMongoError as exc:
            # The error, not its traceback: while MongoDB is down this fails every second, and
            # a rendered traceback (the console renderer highlights each frame's source) costs
            # the event loop far more than the reading it reports on.
            log.warning("relay.lag_unreadable", error=repr(exc))
            return
        OUTBOX_EVENTS.labels("pending").set(lag.pending)
        OUTBOX_EVENTS.labels("set_aside").set(lag.set_aside)
        OUTBOX_OLDEST_AGE.set(lag.oldest_pending_age_seconds or 0.0)

    def _view_serves(self) -> bool:
        """Whether the gauges may come from the fair rounds' view of the pending events: it is
        read whole every few seconds and its newest events every round (a round comes at least
        every ``poll_interval``), so it is as fresh as a reading of its own, which would cost
        SecantusDB a walk of the outbox's whole index range per reading (about 60 ms a second
        with 500 events waiting; a fair outbox holds the bursts, so it is often that long)."""
        return self.fair and self.view.known

    def _known_pending(self) -> tuple[int, datetime | None] | None:
        if not self._view_serves():
            return None
        return len(self.view), self.view.oldest_created()

    async def refresh_backlog(self, *, force: bool = False) -> None:
        """Update the per-user backlog gauge (at most every ``backlog_interval`` seconds)."""
        if not force and time.monotonic() - self._backlog_read_at < self.backlog_interval:
            return
        self._backlog_read_at = time.monotonic()
        try:
            await publish_backlog(self.ctx, self.view.by_type() if self._view_serves() else None)
        except PyMongoError as exc:
            log.warning("relay.backlog_unreadable", error=repr(exc))

    async def drain_once(self) -> int:
        """Claim, send and settle one batch; returns how many events it settled or released.

        Raises the broker's error after releasing the unsent rest when the broker is down.
        """
        if self.fair:
            return await self._drain_fairly()
        events = self.ctx.store["events"]
        now = utcnow()
        free = {
            "pending": True,
            "$and": [
                {"$or": [{"lease_until": None}, {"lease_until": {"$lt": now}}]},
                {"$or": [{"next_attempt_at": None}, {"next_attempt_at": {"$lte": now}}]},
            ],
        }
        fields = {"_id": 1, "lease_owner": 1, "attempts": 1}
        candidates = await events.find(free, fields).sort("_id", 1).limit(self.batch_size).to_list()
        if not candidates:
            return 0
        token = secrets.token_hex(8)
        # By _id under compare-and-set on what was read, as the fair rounds claim: a filter
        # mixing _id with $or makes SecantusDB scan the whole outbox.
        claimed = await fairness.claim(self.ctx, candidates, now, self.lease, token)
        return await self._send_claimed(token, claimed)

    async def _drain_fairly(self) -> int:
        """One fair round (``core/fairness.py``): plan, claim, send, settle."""
        now = utcnow()
        plan = await fairness.plan_round(
            self.ctx,
            self.view,
            now,
            await self._stored.over(self.ctx, self.windows),
            limit=self.batch_size,
            turn=self._turn,
            roles=self._roles,
            horizon=self.redeliver_after + timedelta(seconds=5),
            flights=self.flights,
        )
        self._turn = plan.next_turn
        self.held_back = bool(plan.full) or plan.budget_full
        if not plan.chosen:
            return 0
        token = secrets.token_hex(8)
        claimed = await fairness.claim(self.ctx, plan.chosen, now, self.lease, token)
        # Claimed (ours now), or found sent or leased by another relay: either way not ours to
        # pick again; those that come back (failed, released) are seen at the next whole read.
        self.view.forget([d["_id"] for d in plan.chosen])
        return await self._send_claimed(token, claimed)

    async def _send_claimed(self, token: str, claimed: list[Doc]) -> int:
        if not claimed:
            return 0
        # A stop (the relay's task cancelled, as on SIGTERM) while a batch is out waits for
        # that batch to be sent and settled: cancelled mid-way, its events would wait out
        # their lease before another relay took them (a webhook 30 s late after a rolling
        # restart; RELIABILITY.md). The web's shutdown bounds the wait.
        batch = asyncio.ensure_future(self._send_and_settle(token, claimed))
        try:
            return await asyncio.shield(batch)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await batch
            raise

    async def _send_and_settle(self, token: str, claimed: list[Doc]) -> int:
        outcome = Outcome()
        try:
            await asyncio.to_thread(self._enqueue, claimed, outcome)
        except Exception as exc:
            outcome.outage = exc
        await self._settle(token, claimed, outcome)
        if outcome.outage is not None:
            raise outcome.outage
        return len(claimed)

    def _enqueue(self, claimed: list[Doc], outcome: Outcome) -> None:
        """Send each event's messages in order, recording each event's fate in ``outcome``."""
        suspects: dict[ObjectId, str] = {}
        refused: Exception | None = None
        for event in claimed:
            try:
                messages = self._messages(event)
            except Exception as exc:
                outcome.failed[event["_id"]] = _describe(exc)
                continue
            if not messages:  # an activity-only event: nothing to send, no news of the broker
                outcome.sent.append(event["_id"])
                continue
            try:
                for message in messages:
                    self.broker.enqueue(message)
            except Exception as exc:
                # The broker refused: this event's fault if a later send goes through, an
                # outage if ``outage_after`` sends in a row fail.
                suspects[event["_id"]] = _describe(exc)
                refused = exc
                if len(suspects) >= self.outage_after:
                    outcome.outage = exc
                    return
                continue
            outcome.failed.update(suspects)
            suspects.clear()
            outcome.sent.append(event["_id"])
        if suspects:
            # Nothing after them went through: the broker may be down; charge no one.
            outcome.outage = refused

    def _messages(self, event: Doc) -> list[dramatiq.Message[Any]]:
        """The event's message for each actor it routes to, encoded once as a check."""
        payload = outbox.payload(event)  # typed and validated (core/events.py)
        actors = [self.broker.get_actor(name) for name in CATALOGUE.actors_for(payload.type)]
        messages = [actor.message(payload.wire()) for actor in actors]
        if messages:
            messages[0].encode()  # the payload is the same in each
        return messages

    async def _settle(self, token: str, claimed: list[Doc], outcome: Outcome) -> None:
        events = self.ctx.store["events"]
        by_id = {e["_id"]: e for e in claimed}
        # One update per route (events of one type await the same actors' receipts).
        routes: dict[tuple[str, ...], list[ObjectId]] = {}
        for event_id in outcome.sent:
            actors = CATALOGUE.actors_for(str(by_id[event_id].get("type")))
            routes.setdefault(actors, []).append(event_id)
        now = utcnow()
        for actors, ids in routes.items():
            update: Doc = {
                "$unset": {
                    "pending": "",
                    "lease_until": "",
                    "lease_owner": "",
                    "next_attempt_at": "",
                },
                "$set": {"dispatched_at": now},
            }
            if self.fair and actors:  # it takes a place in its user's window
                update["$set"][fairness.INFLIGHT] = True
                for event_id in ids:
                    self.flights.sent(str(by_id[event_id].get("user_id")))
            if actors:
                due = now + self.redeliver_after
                awaited = outbox.receipt(
                    (), [outbox.Expected(outbox.awaited_key(a), a, due) for a in actors]
                )
                for op, fields in awaited.items():
                    update.setdefault(op, {}).update(fields)
            await events.update_many({"_id": {"$in": ids}, "lease_owner": token}, update)
        if outcome.failed or outcome.outage is not None:
            self.view.stale()  # they stay pending: see them again at the next round
        for event_id, error in outcome.failed.items():
            await self._charge(token, by_id[event_id], error)
        if outcome.outage is not None:
            # Give the unsettled rest back now, so the next round (within max_backoff of the
            # broker's return) retries it instead of waiting out the lease.
            with contextlib.suppress(PyMongoError):
                await events.update_many(
                    {"_id": {"$in": list(by_id)}, "lease_owner": token, "pending": True},
                    {"$unset": {"lease_until": "", "lease_owner": ""}},
                )

    async def _sweep_when_due(self) -> None:
        if time.monotonic() - self._swept_at < self.sweep_interval:
            return
        self._swept_at = time.monotonic()
        try:
            looked_at = await self.sweep_once()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("relay.sweep_error")
            return
        if looked_at >= self.batch_size:
            self._swept_at = -float("inf")  # more are due: sweep again next round

    async def sweep_once(self) -> int:
        """Send again the awaited messages that did not finish in time; returns how many events
        were looked at. Claims come first (so of several relays one resends each message);
        what the broker refuses is given back, due again after ``max_backoff`` seconds."""
        now = utcnow()
        claimed, looked_at = await outbox.claim_overdue(
            self.ctx, now, self.redeliver_after, limit=self.batch_size
        )
        if claimed:
            unsent, error = await asyncio.to_thread(self._resend, claimed)
            if unsent:
                retry_at = utcnow() + timedelta(seconds=self.max_backoff)
                with contextlib.suppress(PyMongoError):
                    await outbox.release(self.ctx, unsent, retry_at)
                log.warning("relay.resend_deferred", count=len(unsent), error=error)
        return looked_at

    def _resend(self, claimed: list[outbox.Resend]) -> tuple[list[outbox.Resend], str | None]:
        """Send each claimed message again; returns those left unsent by a broker failure."""
        for index, item in enumerate(claimed):
            fields = {
                "event_id": str(item.event["_id"]),
                "key": item.key,
                "actor": item.actor,
                "resends": item.resends,
            }
            try:
                message = self._resend_message(item)
            except Exception as exc:  # the actor is gone, or the body cannot be read
                log.error("relay.resend_unbuildable", error=_describe(exc), **fields)
                continue
            try:
                self.broker.enqueue(message)
            except Exception as exc:
                return claimed[index:], _describe(exc)
            RESENT_TOTAL.labels(item.actor).inc()
            log.warning("relay.resent", **fields)
        return [], None

    def _resend_message(self, item: outbox.Resend) -> dramatiq.Message[Any]:
        message: dramatiq.Message[Any]
        if item.message is not None:  # a follow-up: its stored body, as it was sent
            message = dramatiq.Message.decode(item.message.encode())
        else:  # a routed pair: rebuilt from the event
            message = self.broker.get_actor(item.actor).message(outbox.payload(item.event).wire())
        if item.retries:
            message = message.copy(options={"retries": item.retries})
        return message

    async def _charge(self, token: str, event: Doc, error: str) -> None:
        """Count a failed send against ``event``: retry later, or set it aside."""
        attempts = int(event.get("attempts", 0)) + 1
        now = utcnow()
        release = {"lease_until": "", "lease_owner": ""}
        if attempts >= self.max_attempts:
            update: Doc = {
                "$set": {"attempts": attempts, "last_error": error, "set_aside_at": now},
                "$unset": {**release, "pending": "", "next_attempt_at": ""},
            }
        else:
            wait = min(self.max_retry_backoff, self.retry_backoff * 2 ** (attempts - 1))
            update = {
                "$set": {
                    "attempts": attempts,
                    "last_error": error,
                    "next_attempt_at": now + timedelta(seconds=wait),
                },
                "$unset": release,
            }
        result = await self.ctx.store["events"].update_one(
            {"_id": event["_id"], "lease_owner": token}, update
        )
        if not result.modified_count:
            return  # our lease expired and another relay holds the event now
        fields = {"event_id": str(event["_id"]), "type": event.get("type"), "attempts": attempts}
        if attempts >= self.max_attempts:
            SET_ASIDE_TOTAL.inc()
            log.error("relay.event_set_aside", error=error, **fields)
        else:
            log.warning("relay.event_failed", error=error, **fields)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:ERROR_CHARS]
