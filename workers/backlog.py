"""Backlog per user: the users with the most messages waiting, per queue.

A message fed by an event waits in one of two places: still in the outbox (its event is
pending: with fair dispatch a burst waits there, ``core/fairness.py``), or in the broker, sent
and not finished (its event's receipts still await it, ``core/events.py``: routed pairs and
follow-ups such as webhook deliveries). :func:`user_backlog` counts both for each (queue,
user): each pending event counts one message on the queue of each actor its type is routed to
(``workers/catalogue.py``), each unfinished awaited key one on its actor's queue. It reads the
pending events (``fair`` index) and the events with receipts awaited (``receipts`` index), so
it costs what is waiting, not the whole log.

Used by ``GET /api/v1/admin/backlog``, the overview, ``taskmanager backlog`` and the relay,
which publishes the top :data:`GAUGE_TOP` per queue as ``taskmanager_user_backlog``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from prometheus_client import Gauge, values

from core import events as outbox
from core.context import Context
from workers.catalogue import CATALOGUE

#: Users per queue the gauge shows.
GAUGE_TOP = 10
USER_BACKLOG = Gauge(
    "taskmanager_user_backlog",
    f"Messages waiting (in the outbox or in the broker) of the top {GAUGE_TOP} users per queue",
    ["queue", "user_id"],
    # Every relay reads the same outbox: in a web group (web/group.py) the most recent reading
    # of the live processes. A series cannot leave the files there: users who left the top
    # stay at 0 (see publish_backlog).
    multiprocess_mode="livemostrecent",
)
#: The (queue, user) series this process last published.
_published: set[tuple[str, str]] = set()
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class UserBacklog:
    """One user's messages waiting on one queue: ``outbox`` not yet sent, ``in_broker`` sent
    and not finished, ``waiting`` both."""

    user_id: str
    waiting: int
    outbox: int
    in_broker: int

    def as_json(self) -> dict[str, object]:
        """The API's shape."""
        return {
            "user_id": self.user_id,
            "waiting": self.waiting,
            "outbox": self.outbox,
            "in_broker": self.in_broker,
        }


def _queue_of() -> dict[str, str]:
    return {spec.name: spec.queue for spec in CATALOGUE.actors}


async def pending_by_type(ctx: Context) -> dict[tuple[str, str], int]:
    """Pending events per (user id, event type), from the outbox."""
    groups = await (
        await ctx.store["events"].aggregate(
            [
                {"$match": {"pending": True}},
                {"$group": {"_id": {"u": "$user_id", "t": "$type"}, "n": {"$sum": 1}}},
            ]
        )
    ).to_list()
    return {(str(g["_id"].get("u")), str(g["_id"].get("t"))): int(g["n"]) for g in groups}


async def user_backlog(
    ctx: Context,
    *,
    queue: str | None = None,
    limit: int = 10,
    pending: Mapping[tuple[str, str], int] | None = None,
) -> dict[str, list[UserBacklog]]:
    """The ``limit`` users with the most messages waiting on each queue (only ``queue`` when
    given), most first (ties by user id); queues with nothing waiting are left out.
    ``pending``: the outbox's events per (user, type) when the caller knows them (a fair
    relay's view), else they are read (:func:`pending_by_type`)."""
    queue_of = _queue_of()
    held: dict[tuple[str, str], int] = {}
    sent: dict[tuple[str, str], int] = {}
    coll = ctx.store["events"]
    if pending is None:
        pending = await pending_by_type(ctx)
    for (user, type_), n in pending.items():
        for actor in CATALOGUE.actors_for(type_):
            key = (queue_of[actor], user)
            held[key] = held.get(key, 0) + n
    awaited = coll.find(
        {outbox.RECHECK_AT: {"$gte": _EPOCH}},
        {"user_id": 1, outbox.AWAITING: 1, outbox.FINISHED: 1},
    )
    async for doc in awaited:
        user = str(doc.get("user_id"))
        for awaited_key, entry in outbox.unfinished(doc).items():
            on = queue_of.get(str(entry.get("actor") or awaited_key))
            if on is not None:
                sent[(on, user)] = sent.get((on, user), 0) + 1
    out: dict[str, list[UserBacklog]] = {}
    for name, user in held.keys() | sent.keys():
        if queue is not None and name != queue:
            continue
        h, s = held.get((name, user), 0), sent.get((name, user), 0)
        out.setdefault(name, []).append(UserBacklog(user, h + s, h, s))
    return {
        name: sorted(rows, key=lambda r: (-r.waiting, r.user_id))[:limit]
        for name, rows in sorted(out.items())
    }


async def publish_backlog(
    ctx: Context, pending: Mapping[tuple[str, str], int] | None = None
) -> None:
    """Set the ``taskmanager_user_backlog`` gauge to the top :data:`GAUGE_TOP` per queue
    (users that left the top are removed; in prometheus_client's multiprocess mode, where a
    series cannot leave the files, they are set to 0 instead). ``pending``: as for
    :func:`user_backlog`."""
    top = await user_backlog(ctx, limit=GAUGE_TOP, pending=pending)
    now = {(name, row.user_id) for name, rows in top.items() for row in rows}
    if getattr(values.ValueClass, "_multiprocess", False):
        # No ``clear`` here: each series made again would be one more value object that
        # prometheus_client keeps for the life of the process.
        for labels in _published - now:
            USER_BACKLOG.labels(*labels).set(0)
    else:
        USER_BACKLOG.clear()
    for name, rows in top.items():
        for row in rows:
            USER_BACKLOG.labels(name, row.user_id).set(row.waiting)
    _published.clear()
    _published.update(now)


async def backlog_summary(
    ctx: Context, *, queue: str | None = None, limit: int = 10
) -> dict[str, dict[str, list[dict[str, object]]]]:
    """``GET /admin/backlog``'s body (and the overview's ``backlog``):
    ``{"queues": {"<queue>": [{"user_id", "waiting", "outbox", "in_broker"}, ...]}}``."""
    top = await user_backlog(ctx, queue=queue, limit=limit)
    return {"queues": {name: [row.as_json() for row in rows] for name, rows in top.items()}}
