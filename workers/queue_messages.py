"""One message at a time, on the Redis broker: browse a queue's ready and delayed messages, find
a message by id in every queue and state, move one to the head of its ready list ("retry
now"), delete one, and put a dead letter's traceback in the order an operator reads it.

The key layout is :mod:`workers.queue_admin`'s. Every move is one Lua script, so a worker
never sees a message twice and never loses one:

- *ready* (``ns:q`` list + ``ns:q.msgs``): retry now moves the id to the head of the list;
  delete removes it from both. A message whose id is in the hash but no longer in the list was
  fetched by a worker (*in progress*): it is neither moved nor deleted (409).
- *delayed* (``ns:q.DQ`` list + ``ns:q.DQ.msgs``): workers fetch delayed messages eagerly and
  hold them in memory until their eta (their id then sits in ``ns:__acks__.<worker>.q.DQ``).
  Retry now removes the body from the delay hash (and the id from the list or from the
  holder's acks set) and pushes a copy without eta at the head of the ready list, in one
  script. The holding worker releases its in-memory copy at the eta anyway:
  :class:`DelayedReleaseGuard` checks, as it releases it, that the body is still in the delay
  hash, and marks the released copy ``superseded`` otherwise (skipped when a worker takes it,
  acked, not run). Delete works the same way without the copy. A held message due within
  :data:`DUE_MARGIN_MS` is refused (409): its worker is moving it to the ready list right now.
- *dead* (``ns:q.XQ`` zset + ``ns:q.XQ.msgs``): retry now is the replay of
  :meth:`~workers.queue_admin.QueueInspector.retry`; delete removes it from both.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import dq_name, q_name, xq_name
from dramatiq.errors import DecodeError
from dramatiq.middleware import SkipMessage
from dramatiq.worker import ConsumerThread

from config.logging import get_logger
from core.errors import Conflict, NotFound
from workers.registry import _now_ms, _utc

log = get_logger(__name__)

#: A delayed message held by a worker and due within this many ms is not retried now or
#: deleted: its worker is about to move it (clocks of different hosts may differ this much).
DUE_MARGIN_MS = 2000
#: Longest ``args_summary`` of a listed message.
SUMMARY_CHARS = 160
#: Option set on the copy a worker releases from its delay queue after an operator took it.
SUPERSEDED = "superseded_by_operator"
#: What a message id looks like (Dramatiq's are UUIDs): anything else cannot be one.
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# KEYS: list, hash; ARGV: id, "head" | "delete". 0: absent, -1: fetched by a worker.
_READY_LUA = """
if redis.call("hexists", KEYS[2], ARGV[1]) == 0 then
    return 0
end
if redis.call("lrem", KEYS[1], 1, ARGV[1]) == 0 then
    return -1
end
if ARGV[2] == "delete" then
    redis.call("hdel", KEYS[2], ARGV[1])
else
    redis.call("lpush", KEYS[1], ARGV[1])
end
return 1
"""

# KEYS: delay list, delay hash, ready list, ready hash, heartbeats zset;
# ARGV: id, new id, new body ("" to delete), acks key prefix, delay queue name, due soon (1/0).
# 0: absent, -1: held by a live worker and due now.
_DELAYED_LUA = """
if redis.call("hexists", KEYS[2], ARGV[1]) == 0 then
    return 0
end
local held = {}
if redis.call("lrem", KEYS[1], 1, ARGV[1]) == 0 then
    for _, worker in ipairs(redis.call("zrange", KEYS[5], 0, -1)) do
        local acks = ARGV[4] .. worker .. "." .. ARGV[5]
        if redis.call("sismember", acks, ARGV[1]) == 1 then
            held[#held + 1] = acks
        end
    end
    if #held > 0 and ARGV[6] == "1" then
        return -1
    end
end
for _, acks in ipairs(held) do
    redis.call("srem", acks, ARGV[1])
end
redis.call("hdel", KEYS[2], ARGV[1])
if ARGV[3] ~= "" then
    redis.call("hset", KEYS[4], ARGV[2], ARGV[3])
    redis.call("lpush", KEYS[3], ARGV[2])
end
return 1
"""

# KEYS: dead zset, dead hash; ARGV: id.
_DEAD_DELETE_LUA = """
if redis.call("zrem", KEYS[1], ARGV[1]) == 0 then
    return 0
end
redis.call("hdel", KEYS[2], ARGV[1])
return 1
"""


@dataclass(frozen=True)
class MessageSummary:
    """One ready or delayed message as a list shows it. ``id`` is the broker's id of this
    enqueue (what retry and delete take); ``message_id`` is Dramatiq's, kept across retries."""

    id: str
    message_id: str
    queue: str
    actor: str
    state: str
    enqueued_at: datetime
    eta: datetime | None
    retries: int
    args_summary: str
    user_id: str | None


@dataclass(frozen=True)
class MessagePage:
    """A page of a queue's ready (next to be taken first) or delayed (soonest first) messages."""

    items: list[MessageSummary]
    next_cursor: str | None


@dataclass(frozen=True)
class MessageDetail:
    """One message in whatever state it is: ``ready``, ``delayed``, ``in_progress`` or
    ``dead`` (then with its error, its traceback with our frames first, and when it died)."""

    id: str
    message_id: str
    queue: str
    actor: str
    state: str
    enqueued_at: datetime
    eta: datetime | None
    retries: int
    args: list[Any]
    kwargs: dict[str, Any]
    options: dict[str, Any]
    error: str | None
    traceback: str | None
    failed_at: datetime | None


def user_of(message: dramatiq.Message[Any]) -> str | None:
    """The user a message works for: ``user_id`` of its first argument (our events) or of its
    keyword arguments."""
    first = message.args[0] if message.args else None
    value = first.get("user_id") if isinstance(first, dict) else None
    if value is None:
        value = message.kwargs.get("user_id")
    return str(value) if value is not None else None


def summarize(message: dramatiq.Message[Any]) -> str:
    """A short one-line rendering of a message's arguments."""
    parts = [repr(a) for a in message.args] + [f"{k}={v!r}" for k, v in message.kwargs.items()]
    text = ", ".join(parts)
    return text if len(text) <= SUMMARY_CHARS else text[: SUMMARY_CHARS - 1] + "…"


def summary(rid: str, queue: str, state: str, message: dramatiq.Message[Any]) -> MessageSummary:
    """The list item of a decoded message."""
    eta = message.options.get("eta")
    return MessageSummary(
        id=rid,
        message_id=message.message_id,
        queue=queue,
        actor=message.actor_name,
        state=state,
        enqueued_at=_utc(message.message_timestamp),
        eta=_utc(eta) if isinstance(eta, int | float) else None,
        retries=int(message.options.get("retries", 0)),
        args_summary=summarize(message),
        user_id=user_of(message),
    )


# -- tracebacks ---------------------------------------------------------------------------------

#: Top-level packages of this project: their frames are "ours".
OUR_PACKAGES = ("core", "workers", "jobs", "web", "cli")
_CHAINS = ("During handling", "The above exception")
_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+)(?:, in (?P<fn>.+))?$')


def is_ours(path: str) -> bool:
    """Whether a traceback's file is ours: under one of :data:`OUR_PACKAGES`, neither installed
    (``site-packages``) nor a test."""
    parts = path.replace("\\", "/").split("/")
    if {"site-packages", "dist-packages", "tests"} & set(parts):
        return False
    return any(p in OUR_PACKAGES for p in parts[:-1])


def ours_first(tb: str | None) -> str | None:
    """A traceback rearranged for reading: the error line(s), then our frames (most recent
    call last, marked ``>``), then every other frame (Dramatiq's, the libraries') as they
    were. ``None`` stays ``None``; a text without frames is returned as it is."""
    if not tb:
        return tb
    ours: list[str] = []
    theirs: list[str] = []
    errors: list[str] = []
    lines = tb.rstrip("\n").splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        match = _FRAME.match(line)
        if match:
            block = [line.strip()]
            while i + 1 < len(lines) and lines[i + 1].startswith("    "):
                i += 1
                block.append(lines[i].strip())
            mine = is_ours(match["file"])
            target = ours if mine else theirs
            target.append(("> " if mine else "  ") + block[0])
            target += ["      " + b for b in block[1:]]
        elif line and not line.startswith((" ", "Traceback (most recent call last)", *_CHAINS)):
            errors.append(line)
        i += 1
    if not ours and not theirs:
        return tb
    out = errors[-1:] or errors
    out += ["", "Our frames (most recent call last):", *(ours or ["  (none)"])]
    out += ["", "Other frames (Dramatiq, libraries):", *(theirs or ["  (none)"])]
    if len(errors) > 1:
        out += ["", "Chained errors:", *("  " + e for e in errors[:-1])]
    return "\n".join(out)


# -- the Redis operations -----------------------------------------------------------------------


class RedisMessages:
    """Message-level operations on the Redis broker's keys (namespace ``ns``)."""

    def __init__(self, client: Any, namespace: str):
        self.client = client
        self.namespace = namespace
        self._ready = client.register_script(_READY_LUA)
        self._delayed = client.register_script(_DELAYED_LUA)
        self._dead_delete = client.register_script(_DEAD_DELETE_LUA)

    def key(self, name: str) -> str:
        """The Redis key of a broker structure."""
        return f"{self.namespace}:{name}"

    # -- browsing

    def ready(self, queue: str, start: int, limit: int) -> list[MessageSummary]:
        """Up to ``limit`` ready messages from index ``start`` (0: the next one taken)."""
        ids = self.client.lrange(self.key(queue), start, start + limit - 1)
        return self._summaries(queue, "ready", f"{queue}.msgs", ids)

    def index_of(self, queue: str, rid: str) -> int | None:
        """Where a ready message is in its list now (``None``: taken or gone)."""
        pos = self.client.lpos(self.key(queue), rid)
        return int(pos) if pos is not None else None

    def delayed(self, queue: str) -> list[MessageSummary]:
        """Every delayed message of ``queue``, soonest eta first."""
        out: list[MessageSummary] = []
        for rid, body in self.client.hscan_iter(self.key(f"{dq_name(queue)}.msgs"), count=500):
            item = _decode_summary(rid, body, queue, "delayed")
            if item is not None:
                out.append(item)
        far = datetime.max.replace(tzinfo=out[0].enqueued_at.tzinfo) if out else None
        out.sort(key=lambda m: (m.eta or far, m.id))
        return out

    def _summaries(
        self, queue: str, state: str, hash_name: str, ids: list[bytes]
    ) -> list[MessageSummary]:
        if not ids:
            return []
        bodies = self.client.hmget(self.key(hash_name), ids)
        out = []
        for rid, body in zip(ids, bodies, strict=True):
            if body is not None:
                item = _decode_summary(rid, body, queue, state)
                if item is not None:
                    out.append(item)
        return out

    # -- finding

    def find(self, queues: list[str], wanted: str) -> MessageDetail:
        """The message whose broker id (or, failing that, Dramatiq message id) is ``wanted``,
        in any of ``queues`` and any state; :class:`NotFound` when there is none."""
        if not _ID.match(wanted):
            raise NotFound(f"No message with id {wanted!r}")
        places = [
            (q, state, name)
            for q in queues
            for state, name in (
                ("ready", f"{q}.msgs"),
                ("delayed", f"{dq_name(q)}.msgs"),
                ("dead", f"{xq_name(q)}.msgs"),
            )
        ]
        pipe = self.client.pipeline(transaction=False)
        for _, _, name in places:
            pipe.hget(self.key(name), wanted)
        for (q, state, _name), body in zip(places, pipe.execute(), strict=True):
            if body is not None:
                return self._detail(q, state, wanted, body)
        # Not an enqueue's id: Dramatiq's message id, looked for in the bodies (HSCAN's MATCH
        # only sees the hash's fields), in batches.
        needle = f'"message_id":"{wanted}"'.encode()
        for q, state, name in places:
            for rid, body in self.client.hscan_iter(self.key(name), count=1000):
                if needle in body:
                    return self._detail(q, state, rid.decode(), body)
        raise NotFound(f"No message with id {wanted!r}")

    def _detail(self, queue: str, state: str, rid: str, body: bytes) -> MessageDetail:
        message = dramatiq.Message.decode(body)
        failed_at = None
        if state == "ready" and self.index_of(queue, rid) is None:
            state = "in_progress"
        if state == "dead":
            score = self.client.zscore(self.key(xq_name(queue)), rid)
            failed_at = _utc(score) if score is not None else None
        options = dict(message.options)
        tb = options.get("traceback")
        error = options.get("dead_letter_error")
        if error is None and tb:
            error = [line for line in tb.strip().splitlines() if line.strip()][-1][:500]
        eta = options.get("eta")
        return MessageDetail(
            id=rid,
            message_id=message.message_id,
            queue=queue,
            actor=message.actor_name,
            state=state,
            enqueued_at=_utc(message.message_timestamp),
            eta=_utc(eta) if isinstance(eta, int | float) else None,
            retries=int(options.get("retries", 0)),
            args=list(message.args),
            kwargs=dict(message.kwargs),
            options={k: v for k, v in options.items() if k != "traceback"},
            error=error,
            traceback=ours_first(tb),
            failed_at=failed_at,
        )

    # -- acting

    def retry_now(self, queue: str, detail: MessageDetail) -> str:
        """Put a ready or delayed message at the head of the ready list; returns its id there
        (a delayed message gets a new one). :class:`Conflict` if a worker has it."""
        if detail.state in ("ready", "in_progress"):
            self._on_ready(queue, detail.id, "head")
            return detail.id
        message = dramatiq.Message.decode(self._delayed_body(queue, detail.id))
        new_id = str(uuid.uuid4())
        options = {k: v for k, v in message.options.items() if k != "eta"}
        options["redis_message_id"] = new_id
        copy = dataclasses.replace(message, queue_name=queue, options=options)
        self._on_delayed(queue, detail, new_id, copy.encode())
        return new_id

    def delete(self, queue: str, detail: MessageDetail) -> None:
        """Delete a ready, delayed or dead message (:class:`Conflict` if a worker has it)."""
        if detail.state in ("ready", "in_progress"):
            self._on_ready(queue, detail.id, "delete")
        elif detail.state == "delayed":
            self._on_delayed(queue, detail, "", b"")
        elif not self.delete_dead(queue, detail.id):
            raise NotFound(f"No dead letter {detail.id!r} in {queue!r}")

    def delete_dead(self, queue: str, rid: str) -> bool:
        """Drop one dead letter; ``False`` when it is not (or no longer) there."""
        zkey = self.key(xq_name(queue))
        return bool(self._dead_delete(keys=[zkey, f"{zkey}.msgs"], args=[rid]))

    def _delayed_body(self, queue: str, rid: str) -> bytes:
        body = self.client.hget(self.key(f"{dq_name(queue)}.msgs"), rid)
        if body is None:
            raise NotFound(f"No delayed message {rid!r} in {queue!r}")
        return bytes(body)

    def _on_ready(self, queue: str, rid: str, mode: str) -> None:
        done = self._ready(keys=[self.key(queue), self.key(f"{queue}.msgs")], args=[rid, mode])
        if done == 0:
            raise NotFound(f"No ready message {rid!r} in {queue!r}")
        if done == -1:
            raise Conflict(f"Message {rid!r} is in progress: a worker has taken it")

    def _on_delayed(self, queue: str, detail: MessageDetail, new_id: str, body: bytes) -> None:
        due = detail.eta is not None and detail.eta.timestamp() * 1000 <= _now_ms() + DUE_MARGIN_MS
        dq = dq_name(queue)
        done = self._delayed(
            keys=[
                self.key(dq),
                self.key(f"{dq}.msgs"),
                self.key(queue),
                self.key(f"{queue}.msgs"),
                self.key("__heartbeats__"),
            ],
            args=[detail.id, new_id, body, self.key("__acks__."), dq, "1" if due else "0"],
        )
        if done == 0:
            raise NotFound(f"No delayed message {detail.id!r} in {queue!r}")
        if done == -1:
            raise Conflict(
                f"Message {detail.id!r} is due now: a worker is moving it to the ready list"
            )


def _decode_summary(rid: bytes, body: bytes, queue: str, state: str) -> MessageSummary | None:
    try:
        return summary(rid.decode(), queue, state, dramatiq.Message.decode(body))
    except (DecodeError, TypeError, ValueError):
        return None


# -- the worker's side ----------------------------------------------------------------------------


class DelayedReleaseGuard(dramatiq.Middleware):
    """Drops the in-memory copy of a delayed message an operator retried or deleted.

    A worker holds the delayed messages it fetched until their eta, then enqueues a copy on
    the ready queue (Dramatiq's ``handle_delayed_messages``). When that copy is enqueued, this
    checks that the held message's body is still in the delay hash; if an operator took it
    (retry now, delete), the copy is marked :data:`SUPERSEDED` and skipped when taken: acked,
    never run, counted neither processed nor failed.
    """

    def __init__(self) -> None:
        self._held: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()

    def before_delay_message(self, broker: dramatiq.Broker, message: Any) -> None:
        """Remember which delay-queue entry a held message is."""
        rid = message.options.get("redis_message_id")
        if isinstance(broker, RedisBroker) and rid:
            with self._lock:
                self._held[message.message_id] = (message.queue_name, rid)

    def before_enqueue(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
        """A consumer thread enqueuing is releasing a held delayed message: was it taken?"""
        if delay is not None or not isinstance(threading.current_thread(), ConsumerThread):
            return
        with self._lock:
            held = self._held.pop(message.message_id, None)
        if held is None or not isinstance(broker, RedisBroker):
            return
        dq, rid = held
        try:
            present = broker.client.hexists(f"{broker.namespace}:{dq}.msgs", rid)
        except redis.RedisError:
            return  # run it rather than lose it: actors are idempotent
        if not present:
            message.options[SUPERSEDED] = True
            log.info("queue.delayed_superseded", message_id=message.message_id, queue=q_name(dq))

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        """Skip a superseded copy."""
        if message.options.get(SUPERSEDED):
            raise SkipMessage("taken by an operator while delayed")
