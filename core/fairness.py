"""Fair dispatch: the outbox as the scheduler of every message fed by events.

Without it the relay sends the outbox in the order it was written, so one user's burst of
2,000 writes puts thousands of messages in every queue ahead of the next user's one. With it
(``FAIR_SHARE``, on by default) the relay keeps only a bounded *window* of each user's events
in the broker at a time and fills the windows round-robin across users:

- **in flight**: an event the relay sent whose side effects have not all finished: its
  receipts (``core/events.py``) still await a key, routed pair or follow-up (e.g. a webhook
  delivery, deferred or retried). The relay marks each event it sends with
  ``inflight: true`` (sparse index ``inflight``) and unmarks it once nothing is awaited;
  :func:`in_flight` reads only marked events, so a round costs what is in flight, not what
  is waiting. A lost receipt keeps its event in flight until the relay's sweep has sent the
  message again and it finished (``OUTBOX_REDELIVER_AFTER_S``);
- **window**: ``FAIR_SHARE_WINDOW`` events per user, times the user's weight
  (``FAIR_SHARE_WEIGHTS``: ``user_id=4``, ``role:admin=2`` for a class of users, ``default``;
  weights set through the admin API, collection :data:`WEIGHTS`, override those of the
  settings key by key and reach every relay within :data:`WEIGHTS_TTL`); events claimed
  (leased) by a relay and not yet sent count against it too;
- **budget** (``FAIR_SHARE_BUDGET``, off by default): events in flight across all users at
  most. Without it 100 users with 32-event windows can put 3,200 events in the broker at
  once, served in the order they were written: whoever wrote last waits behind everyone.
  With it the broker holds a short line and the round-robin decides who goes next, which
  aims at each user's burst served in time proportional to its size (equal slowdown, the
  processor-sharing notion of fairness). Off by default because it costs throughput: an
  event holds its place until its side effects finished and a relay round (every
  ``fair_poll`` at best) has seen the receipts, so a short line leaves workers idle between
  refills (measured in the README, Fair share: 32 took 4.6 times as long to index 905 tasks);
- **round-robin**: each round, the users with pending events (the relay's
  :class:`PendingView`: the outbox read whole every few seconds through the ``outbox`` index,
  and only the newest events in between) are taken in turn from a rotating start, one event
  each per pass, until their windows or the relay's batch are full; each user's oldest free
  events first;
- **claims without ``$or``**: chosen events are claimed by ``_id`` under compare-and-set on
  what was read (``lease_owner``, ``attempts``, still ``pending``), so several relays share
  the work and each event is sent by one; an expired lease is taken over the same way. (A
  query mixing ``_id`` with ``$or`` makes SecantusDB scan the whole collection, and
  SecantusDB walks an index range whole whatever the limit: no query of a round reads the
  whole outbox.) Two relays filling the same user's window at the same moment may overshoot
  it by one batch, and a relay counts other relays' sends only at its next reading of what
  is in flight (:class:`FlightCounts`): the window bounds the broker's share, it is not a
  lock.

Scheduled jobs (``maintenance`` queue) never pass through the outbox: with the windows, at
most the windows' messages are ever ahead of them, so they keep their share of the threads.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from bson import ObjectId
from bson.errors import InvalidId

from config.settings import WEIGHT_KEY, Settings, parse_share_weights
from core import events as outbox
from core.context import Context
from core.store import Doc, utcnow

#: The event field marking a sent event whose side effects may not all have finished (it takes
#: a place in its ``user_id``'s window).
INFLIGHT = "inflight"
#: How long a user's role (for ``role:`` weights) is remembered (seconds of monotonic time).
ROLE_TTL = 60.0
#: The collection of weights set through the admin API: ``_id`` is the key (a user id,
#: ``role:<role>`` or ``default``), ``weight`` a whole number from 1 to 1000.
WEIGHTS = "share_weights"
#: How long a relay keeps the stored weights before reading them again (seconds).
WEIGHTS_TTL = 5.0


@dataclass(frozen=True)
class Windows:
    """Each user's window: ``size`` events times the user's weight; ``budget`` events in
    flight across all users."""

    size: int
    weights: Mapping[str, int] = field(default_factory=dict)
    budget: int = 100_000

    @classmethod
    def from_settings(cls, settings: Settings) -> Windows:
        """``FAIR_SHARE_WINDOW``, ``FAIR_SHARE_WEIGHTS`` and ``FAIR_SHARE_BUDGET``."""
        return cls(
            settings.fair_share_window,
            parse_share_weights(settings.fair_share_weights),
            settings.fair_share_budget or cls.budget,
        )

    def with_weights(self, stored: Mapping[str, int]) -> Windows:
        """These windows with ``stored`` weights (the admin API's) over the settings'."""
        return replace(self, weights={**self.weights, **stored})

    @property
    def by_role(self) -> bool:
        """Whether some weight names a class of users (``role:``)."""
        return any(key.startswith("role:") for key in self.weights)

    def weight(self, user_id: str, role: str | None = None) -> int:
        """The user's weight: their own, else their role's, else ``default``, else 1."""
        if user_id in self.weights:
            return self.weights[user_id]
        if role is not None and f"role:{role}" in self.weights:
            return self.weights[f"role:{role}"]
        return self.weights.get("default", 1)

    def of(self, user_id: str, role: str | None = None) -> int:
        """The user's window (events in flight at most)."""
        return self.size * self.weight(user_id, role)


async def in_flight(ctx: Context, horizon: datetime | None = None) -> dict[str, int]:
    """Events in flight per user. An event counts while one of its awaited messages is
    unfinished and due by ``horizon`` (the relay passes now + ``OUTBOX_REDELIVER_AFTER_S`` +
    a few seconds): messages just sent, running, or retried soon. A message parked until a
    later retry (a webhook backing off for an hour) or sent again twice without finishing
    (its due doubles) no longer takes its owner's window, so a dead receiver never holds back
    its owner's other side effects. Events with nothing counting are unmarked."""
    coll = ctx.store["events"]
    docs = await coll.find(
        {INFLIGHT: True}, {"user_id": 1, outbox.AWAITING: 1, outbox.FINISHED: 1}
    ).to_list()
    counts: dict[str, int] = {}
    done: list[ObjectId] = []
    for doc in docs:
        left = outbox.unfinished(doc).values()
        if any(horizon is None or e.get("due") is None or e["due"] <= horizon for e in left):
            user = str(doc.get("user_id"))
            counts[user] = counts.get(user, 0) + 1
        else:
            done.append(doc["_id"])
    if done:
        await coll.update_many({"_id": {"$in": done}}, {"$unset": {INFLIGHT: ""}})
    return counts


class FlightCounts:
    """A relay's events in flight per user between readings of :func:`in_flight`.

    A reading is reused while it is younger than ``max_age`` seconds, raised by what this
    relay sends meanwhile (:meth:`sent`). Events only leave flight between readings, so the
    raised counts are an upper bound for this relay's own sends; a round reads again as soon
    as a user with pending events might have reached their window (or all of them the
    budget), so a full window is always judged on a fresh reading. At a steady trickle of
    writes this is two readings (and unmarkings of finished events) a second at most instead
    of one per round: measured at 20 writes/s, the relay's operations per write fell from 6.3
    to 3.6.

    Other relays' sends are seen at the next reading: with N relays (a web group) a user's
    window can be overshot by up to N - 1 windows for up to ``max_age`` after a reading, at
    the start of a burst (afterwards each relay's count is at the window and every round
    reads again). The windows bound the broker's share; they are not a lock.
    """

    def __init__(self, max_age: float = 0.5) -> None:
        self.max_age = max_age
        self.counts: dict[str, int] = {}
        self._read_at = -float("inf")

    async def read(
        self, ctx: Context, horizon: datetime, might_be_full: Callable[[Mapping[str, int]], bool]
    ) -> dict[str, int]:
        """The counts: the last reading raised by what was sent since, unless it is older
        than ``max_age`` or ``might_be_full`` of it (then :func:`in_flight` again)."""
        clock = asyncio.get_running_loop().time()
        if clock - self._read_at >= self.max_age or might_be_full(self.counts):
            self.counts = await in_flight(ctx, horizon)
            self._read_at = clock
        return dict(self.counts)

    def sent(self, user: str, n: int = 1) -> None:
        """``n`` more of ``user``'s events were sent and take places in their window."""
        self.counts[user] = self.counts.get(user, 0) + n


#: What the relay reads of a pending event (``type`` and ``created_at`` for the gauges).
FIELDS = {
    "user_id": 1,
    "type": 1,
    "created_at": 1,
    "lease_until": 1,
    "lease_owner": 1,
    "next_attempt_at": 1,
    "attempts": 1,
}


class PendingView:
    """The relay's picture of the pending events: each user's, oldest first.

    Read whole (one pass over the ``outbox`` index, at most ``max_events``) every
    ``refresh_every`` seconds, and in between only the events written since the last read
    (``_id`` after it, less ``overlap`` for transactions that commit late): a burst waiting in
    the outbox costs one read per ``refresh_every``, not one per round. (SecantusDB walks an
    index range whole whatever the limit; MongoDB would not mind either way.) Events another
    relay sent, leased or failed meanwhile are found out at the claim (compare-and-set) and
    forgotten until the next whole read.
    """

    def __init__(
        self,
        *,
        refresh_every: float = 5.0,
        overlap: timedelta = timedelta(seconds=2),
        max_events: int = 100_000,
    ) -> None:
        self.refresh_every = refresh_every
        self.overlap = overlap
        self.max_events = max_events
        self.by_user: dict[str | None, dict[ObjectId, Doc]] = {}
        self._since: ObjectId | None = None
        self._read_at = -float("inf")

    def __len__(self) -> int:
        return sum(len(events) for events in self.by_user.values())

    async def refresh(self, ctx: Context, now: datetime, *, whole: bool = False) -> None:
        """Read what changed: everything when due (or ``whole``), else the newest events."""
        coll = ctx.store["events"]
        clock = asyncio.get_running_loop().time()
        since = self._since
        if whole or since is None or clock - self._read_at >= self.refresh_every:
            docs = (
                await coll.find({"pending": True}, FIELDS)
                .sort("_id", 1)
                .limit(self.max_events)
                .to_list()
            )
            self.by_user = {}
            self._read_at = clock
        else:
            # Whole: the round that claims one of them then needs no re-read (:func:`claim`).
            docs = await coll.find({"pending": True, "_id": {"$gt": since}}).to_list()
        self._since = ObjectId.from_datetime(now - self.overlap)
        for doc in docs:
            user = doc.get("user_id")
            self.by_user.setdefault(None if user is None else str(user), {})[doc["_id"]] = doc

    def stale(self) -> None:
        """Read everything again at the next refresh (events given back to the outbox)."""
        self._read_at = -float("inf")

    @property
    def known(self) -> bool:
        """Whether the view has been read (whole, at least once)."""
        return self._since is not None

    def oldest_created(self) -> datetime | None:
        """When the oldest pending event known was written (``None``: none pending)."""
        docs = [doc for events in self.by_user.values() for doc in events.values()]
        if not docs:
            return None
        first = min(docs, key=lambda d: d["_id"])
        made = first.get("created_at")
        return made if isinstance(made, datetime) else first["_id"].generation_time

    def by_type(self) -> dict[tuple[str, str], int]:
        """Pending events known per (user id, event type)."""
        counts: dict[tuple[str, str], int] = {}
        for user, events in self.by_user.items():
            for doc in events.values():
                key = (str(user), str(doc.get("type")))
                counts[key] = counts.get(key, 0) + 1
        return counts

    def forget(self, ids: list[ObjectId]) -> None:
        """Drop events (claimed, or found not to be claimable)."""
        gone = set(ids)
        for user in list(self.by_user):
            events = self.by_user[user]
            for oid in gone.intersection(events):
                del events[oid]
            if not events:
                del self.by_user[user]

    def oldest(self, user: str | None, n: int) -> list[Doc]:
        """The user's ``n`` oldest known pending events."""
        events = self.by_user.get(user, {})
        return [events[oid] for oid in heapq.nsmallest(n, events)]


class Roles:
    """Users' roles for ``role:`` weights, read in batches and remembered :data:`ROLE_TTL`."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[float, str | None]] = {}

    async def of(self, ctx: Context, users: list[str]) -> dict[str, str | None]:
        """The role of each user (``None`` for an unknown or malformed id)."""
        now = asyncio.get_running_loop().time()
        stale = [u for u in users if now - self._known.get(u, (-ROLE_TTL, None))[0] >= ROLE_TTL]
        oids: list[ObjectId] = []
        for user in stale:
            self._known[user] = (now, None)
            try:
                oids.append(ObjectId(user))
            except (InvalidId, TypeError):
                continue
        if oids:
            docs = await ctx.store["users"].find({"_id": {"$in": oids}}, {"role": 1}).to_list()
            for doc in docs:
                self._known[str(doc["_id"])] = (now, str(doc.get("role") or "user"))
        return {u: self._known[u][1] for u in users}


def check_weight(key: str, weight: int) -> None:
    """``ValueError`` naming what is wrong with a weight for ``key``."""
    if not WEIGHT_KEY.fullmatch(key):
        raise ValueError(f"{key!r} is not a weight key: a user id, role:<role> or default")
    if not 1 <= weight <= 1000:
        raise ValueError("the weight must be a whole number from 1 to 1000")


async def stored_weights(ctx: Context) -> dict[str, int]:
    """The weights set through the admin API, by key."""
    docs = await ctx.store[WEIGHTS].find({}, {"weight": 1}).to_list()
    return {str(d["_id"]): int(d["weight"]) for d in docs}


async def set_weight(ctx: Context, key: str, weight: int, by: str | None = None) -> None:
    """Give ``key`` (a user, a role, ``default``) ``weight``; overrides the settings' weight
    for that key on every relay within :data:`WEIGHTS_TTL`."""
    check_weight(key, weight)
    await ctx.store[WEIGHTS].update_one(
        {"_id": key},
        {"$set": {"weight": weight, "updated_at": utcnow(), "updated_by": by}},
        upsert=True,
    )


async def unset_weight(ctx: Context, key: str) -> bool:
    """Drop the stored weight of ``key`` (the settings' applies again); whether there was one."""
    result = await ctx.store[WEIGHTS].delete_one({"_id": key})
    return result.deleted_count == 1


class StoredWeights:
    """The relay's copy of the stored weights, read again every :data:`WEIGHTS_TTL`."""

    def __init__(self, ttl: float = WEIGHTS_TTL) -> None:
        self.ttl = ttl
        self._weights: dict[str, int] = {}
        self._read_at = -float("inf")

    async def over(self, ctx: Context, windows: Windows) -> Windows:
        """``windows`` with the stored weights over the settings' ones."""
        clock = asyncio.get_running_loop().time()
        if clock - self._read_at >= self.ttl:
            self._weights = await stored_weights(ctx)
            self._read_at = clock
        return windows.with_weights(self._weights) if self._weights else windows


@dataclass
class Plan:
    """What one round may claim: each chosen event as it was read."""

    chosen: list[Doc] = field(default_factory=list)
    #: Users whose window is full with more of their events waiting.
    full: list[str] = field(default_factory=list)
    #: Whether the budget (events in flight across all users) held events back.
    budget_full: bool = False
    #: Where the next round starts: just after the last user served.
    next_turn: int = 0


def _whole(doc: Doc) -> bool:
    """Whether ``doc`` was read whole (not through :data:`FIELDS`): it carries its data."""
    return "data" in doc and "user_id" in doc and "created_at" in doc


def _is_free(doc: Doc, now: datetime) -> bool:
    lease = doc.get("lease_until")
    due = doc.get("next_attempt_at")
    return (lease is None or lease < now) and (due is None or due <= now)


async def plan_round(
    ctx: Context,
    view: PendingView,
    now: datetime,
    windows: Windows,
    *,
    limit: int,
    turn: int = 0,
    roles: Roles | None = None,
    horizon: timedelta = timedelta(seconds=65),
    flights: FlightCounts | None = None,
) -> Plan:
    """Choose up to ``limit`` events to send: round-robin over the users with pending events
    (as ``view`` knows them, refreshed first), starting at ``turn`` (modulo their number),
    each within their window (:func:`in_flight` up to ``now + horizon``, through ``flights``
    when given), all within the budget. Events without a user (malformed) are sent, and
    fail, like any other, one window's worth per round."""
    await view.refresh(ctx, now)
    plan = Plan(next_turn=turn)
    users = sorted(u for u in view.by_user if u is not None)
    role_of = await (roles or Roles()).of(ctx, users) if windows.by_role and users else {}

    def might_be_full(counts: Mapping[str, int]) -> bool:
        if sum(counts.values()) + limit > windows.budget:
            return True
        return any(
            counts.get(u or "", 0) >= windows.of(u or "", role_of.get(u or ""))
            for u in view.by_user
        )

    if not view.by_user:
        flying: dict[str, int] = {}
    elif flights is None:
        flying = await in_flight(ctx, now + horizon)
    else:
        flying = await flights.read(ctx, now + horizon, might_be_full)
    start = turn % len(users) if users else 0
    order: list[str | None] = [None, *users[start:], *users[:start]]
    queues: list[list[Doc]] = []
    spare = windows.budget - sum(flying.values())
    for user in order:
        if user not in view.by_user:
            continue
        room = windows.of(user or "", role_of.get(user or "")) - flying.get(user or "", 0)
        known = view.oldest(user, max(room, 0) * 2 + 4) if room > 0 else []
        # Events another relay holds under a live lease are about to take the window too.
        leased = sum(1 for d in known if d.get("lease_until") and d["lease_until"] >= now)
        spare -= leased
        mine = [d for d in known if _is_free(d, now)][: max(0, room - leased)]
        if mine:
            queues.append(mine)
        left = len(view.by_user[user]) - len(mine)
        if user is not None and room - leased - len(mine) <= 0 < left:
            plan.full.append(user)  # more are waiting than the window lets out
    if queues and spare < limit:
        plan.budget_full = True
        limit = max(spare, 0)
    # One event per user per pass, until the batch (or the budget) is full.
    for depth in itertools.count():
        row = [q[depth] for q in queues if depth < len(q)]
        if not row:
            break
        plan.chosen.extend(row[: limit - len(plan.chosen)])
        if len(plan.chosen) >= limit:
            break
    # The next round starts just after the user who got the last place.
    last = plan.chosen[-1].get("user_id") if plan.chosen else None
    if last is not None and str(last) in users:
        plan.next_turn = start + order.index(str(last))
    return plan


async def claim(
    ctx: Context, chosen: list[Doc], now: datetime, lease: timedelta, token: str
) -> list[Doc]:
    """Lease the chosen events to ``token`` (each only if still as it was read: same lease
    owner and attempts, still pending); returns the claimed events, whole, in ``_id`` order."""
    coll = ctx.store["events"]
    groups: dict[tuple[Any, Any], list[ObjectId]] = {}
    for doc in chosen:
        groups.setdefault((doc.get("lease_owner"), doc.get("attempts")), []).append(doc["_id"])
    until = now + lease
    claimed = 0
    for (owner, attempts), ids in groups.items():
        result = await coll.update_many(
            {"_id": {"$in": ids}, "pending": True, "lease_owner": owner, "attempts": attempts},
            {"$set": {"lease_until": until, "lease_owner": token}},
        )
        claimed += result.modified_count
    if claimed == len(chosen) and all(_whole(d) for d in chosen):
        # Every one was as read, and read whole (the view's newest events are): no re-read.
        # What the claim checked (pending, lease, attempts) is all that changes on an event
        # before it is sent; its envelope and data never do.
        mine = [{**d, "lease_until": until, "lease_owner": token} for d in chosen]
        return sorted(mine, key=lambda d: d["_id"])
    docs = await coll.find({"_id": {"$in": [d["_id"] for d in chosen]}}).to_list()
    mine = [d for d in docs if d.get("lease_owner") == token and d.get("pending")]
    return sorted(mine, key=lambda d: d["_id"])
