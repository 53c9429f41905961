"""Webhook actors: fan an event out to the user's webhooks, and POST each delivery.

``fan_out_webhooks`` (fed by the relay with task events) creates one delivery per matching
webhook, idempotently, and enqueues ``deliver_webhook(delivery_id, generation)``. That actor
POSTs the signed body; a non-2xx answer, a redirect (never followed), a timeout or a network
error raises :class:`DeliveryFailed`, which Dramatiq retries with exponential backoff
(``WEBHOOK_MAX_RETRIES``, ``WEBHOOK_MIN_BACKOFF_MS``, ``WEBHOOK_MAX_BACKOFF_MS``). When retries
run out the message goes to the dead-letter queue and Dramatiq's ``on_retry_exhausted`` hook
sends ``webhook_delivery_exhausted``, which marks the delivery ``dead``. A redelivery request
(API) is an outbox event routed to ``redeliver_webhook``, which enqueues a new attempt.

Isolation (see :mod:`core.webhooks`). Every actor here is on the ``webhooks`` queue, which runs
in a pool of its own (``taskmanager run``: :mod:`workers.pools`; deployments: the
``worker-webhooks`` process), so slow receivers never take the threads of search, cache,
notifications or analytics. The POST itself holds one of its owner's in-flight slots, taken
once the delivery is leased and its webhook read, given back before the attempt is recorded:
the slots bound the requests a user's receivers have open, and the delivery's own reads and
writes (four on MongoDB) never hold one (held around them, the slots of a user writing 30
tasks/s were taken by the test server's latency and 41 of 120 deliveries waited). When they
are all taken it raises :class:`Deferred` and comes back after :data:`DEFER_MS` (plus jitter)
without spending a retry (:class:`RetryRefund`); while they all look taken before it starts,
the message waits without touching MongoDB (it takes a slot first, which also frees the slots
of dead workers, or is deferred). A paused webhook (circuit breaker) gets nothing: its
deliveries are recorded as ``held``.

Leases. An attempt holds the delivery's lease (:func:`core.webhooks.claim`), which names this
worker process (its heartbeat registration, :mod:`workers.heartbeat`), and so does its slot.
A message that meets a live lease (a duplicate, or a redelivery while the attempt is still
running) is :class:`Deferred` for :data:`LEASE_WAIT_MS` (plus jitter), again without spending a
retry. When the worker holding the lease dies, its heartbeat stops; after
``WORKER_HEARTBEAT_TIMEOUT_MS`` the broker hands its message to another worker
(:mod:`workers.heartbeat`), which finds the lease dead, takes it over and attempts at once: a
delivery interrupted by a crash resumes about ``WORKER_HEARTBEAT_TIMEOUT_MS`` + 2 s later (12 s
with the defaults), whatever ``WEBHOOK_TIMEOUT`` and ``WEBHOOK_MAX_RETRIES`` are.

Connections. Each attempt re-checks the target (:func:`core.ssrf.check_target`: one DNS
lookup, every address validated) and then connects only to those validated addresses: the
session's resolver is a :class:`PinnedResolver` that answers aiohttp with them instead of
looking the name up again, so a DNS answer that changes between check and connect (DNS
rebinding) cannot redirect the request. The URL keeps its host name, so ``Host`` and TLS
(SNI and certificate verification) are those of the name. No proxy from the environment is
used, redirects are not followed, the whole request has ``WEBHOOK_TIMEOUT`` seconds (3 to
connect), and at most :data:`core.webhooks.EXCERPT_BYTES` of the answer are read.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import aiohttp
import dramatiq
import structlog
from aiohttp.abc import AbstractResolver, ResolveResult
from bson import ObjectId
from dramatiq.broker import MessageProxy

from config.logging import get_logger
from config.settings import Settings
from core import ssrf, webhooks
from core.context import Context
from core.events import TaskEvent, WebhookRedeliveryEvent
from core.ssrf import Target, TargetRefused, TargetUnresolvable
from core.store import Doc
from core.webhooks import Attempt, SecretUnreadable
from workers.actors import ActorContext
from workers.heartbeat import WorkerHeartbeat
from workers.hooks import OutcomeMiddleware
from workers.registry import registry_index

QUEUE = "webhooks"
#: The queues of this concern: the pool that serves them is kept apart from the others.
QUEUES: frozenset[str] = frozenset({QUEUE})
#: How long a delivery over its owner's in-flight cap waits before it tries again (ms), plus
#: up to as much again of jitter.
DEFER_MS = 500
#: How long a message that meets a live lease on its delivery waits before it looks again
#: (ms), plus up to half as much again of jitter.
LEASE_WAIT_MS = 1000
#: How long a leased delivery waits for one of its owner's slots before it is deferred (s).
SLOT_WAIT_S = 0.1
log = get_logger(__name__)


class DeliveryFailed(Exception):
    """An attempt failed in a way a later attempt may not (retried with backoff)."""


class DeliveryRefused(Exception):
    """A delivery that must not be attempted (target refused, secret unreadable): no retry."""


class Deferred(dramatiq.Retry):
    """Not now (the owner's in-flight cap is reached, or another message holds the delivery's
    live lease): try again after ``delay`` ms, without spending a retry (:class:`RetryRefund`
    gives it back)."""


class RetryRefund(OutcomeMiddleware):
    """Gives back the retry that Dramatiq's ``Retries`` middleware counts for a
    :class:`Deferred` message, so waiting for a slot never uses up a delivery's retries.

    ``after_*`` hooks run in reverse order of the middleware list, and this one is added after
    ``Retries`` (a default middleware), so it runs first.
    """

    def message_ended(
        self, broker: dramatiq.Broker, message: MessageProxy, exception: BaseException | None
    ) -> None:
        """Pre-pay the retry that ``Retries`` is about to count."""
        if isinstance(exception, Deferred):
            message.options["retries"] = int(message.options.get("retries", 0)) - 1


class PinnedResolver(AbstractResolver):
    """Answers aiohttp's lookup of the target's host with the addresses the check validated."""

    def __init__(self, target: Target):
        self.target = target

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """The validated addresses (of ``family``, unless it is ``AF_UNSPEC``)."""
        if host.rstrip(".").lower() != self.target.host.rstrip(".").lower():
            raise OSError(f"refusing to resolve {host!r}: not the checked target")
        results = [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=addr_family,
                proto=socket.IPPROTO_TCP,
                flags=socket.AI_NUMERICHOST,
            )
            for addr_family, address in self.target.addresses
            if family in (socket.AF_UNSPEC, addr_family)
        ]
        if not results:
            raise OSError(f"no checked address of {host!r} in family {family!r}")
        return results

    async def close(self) -> None:
        """Nothing to release."""


async def _excerpt(response: aiohttp.ClientResponse) -> str:
    buf = b""
    while len(buf) < webhooks.EXCERPT_BYTES:
        chunk = await response.content.read(webhooks.EXCERPT_BYTES - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf.decode("utf-8", "replace")


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:500]


async def post(
    url: str, headers: dict[str, str], body: bytes, target: Target, seconds: float
) -> Attempt:
    """POST ``body`` to ``url``, connecting only to ``target``'s checked addresses."""
    connector = aiohttp.TCPConnector(
        resolver=PinnedResolver(target), use_dns_cache=False, force_close=True
    )
    limits = aiohttp.ClientTimeout(total=seconds, connect=min(3.0, seconds))
    try:
        async with (
            aiohttp.ClientSession(
                connector=connector, timeout=limits, auto_decompress=False, trust_env=False
            ) as session,
            session.post(
                url,
                data=body,
                headers={**headers, "Accept-Encoding": "identity"},
                allow_redirects=False,
            ) as response,
        ):
            code = response.status
            location = response.headers.get("Location", "")
            excerpt = await _excerpt(response)
    except TimeoutError:
        return Attempt(ok=False, error=f"timed out after {seconds:g} s")
    except (aiohttp.ClientError, OSError) as exc:
        return Attempt(ok=False, error=_describe(exc))
    if 200 <= code < 300:
        return Attempt(ok=True, response_code=code, excerpt=excerpt)
    redirect = 300 <= code < 400
    error = f"redirect to {location[:200]!r} not followed" if redirect else f"HTTP {code}"
    return Attempt(ok=False, response_code=code, excerpt=excerpt, error=error)


async def attempt_delivery(settings: Settings, hook: Doc, delivery: Doc) -> Attempt:
    """Check the target again and POST the delivery once; :class:`DeliveryRefused` when it
    must not be attempted at all."""
    try:
        secret = webhooks.open_secret(settings, str(hook["_id"]), hook["secret"])
        target = await ssrf.check_target(hook["url"], settings.webhook_allow_hosts)
    except SecretUnreadable as exc:
        raise DeliveryRefused(str(exc)) from exc
    except TargetRefused as exc:
        # The user sees only "not allowed"; the operator's log says what the name resolved to.
        log.warning("webhook.target_refused", reason=exc.reason)
        raise DeliveryRefused(str(exc)) from exc
    except TargetUnresolvable as exc:
        log.info("webhook.target_unresolvable", reason=exc.reason)
        return Attempt(ok=False, error=str(exc))
    timestamp = int(time.time())
    headers = webhooks.request_headers(delivery, secret, timestamp)
    return await post(
        hook["url"], headers, delivery["body"].encode(), target, settings.webhook_timeout
    )


def lease_holder(broker: dramatiq.Broker | None) -> webhooks.Holder | None:
    """This worker process as the holder of delivery leases and slots: its heartbeat
    registration, once it has booted (``None`` without one: leases then die only with time)."""
    if broker is None:
        return None
    for middleware in broker.middleware:
        if isinstance(middleware, WorkerHeartbeat) and middleware.state in ("running", "stopping"):
            return webhooks.Holder(middleware.worker_id, registry_index(middleware.prefix))
    return None


def retry_options(settings: Settings) -> dict[str, Any]:
    """``deliver_webhook``'s retry options (``WEBHOOK_MAX_RETRIES``, ``WEBHOOK_MIN_BACKOFF_MS``,
    ``WEBHOOK_MAX_BACKOFF_MS``)."""
    return {
        "max_retries": settings.webhook_max_retries,
        "min_backoff": settings.webhook_min_backoff_ms,
        "max_backoff": settings.webhook_max_backoff_ms,
    }


def _lease(settings: Settings) -> timedelta:
    """A lease's time bound: a backstop, since the lease dies with its worker's heartbeat."""
    return timedelta(seconds=settings.webhook_timeout + 20)


async def fan_out_webhooks(ctx: ActorContext, event: TaskEvent) -> None:
    """Create one delivery per webhook subscribed to the event, and enqueue each."""
    for hook in await webhooks.matching(ctx, event.user_id, event.type):
        delivery, needs_enqueue = await webhooks.ensure_delivery(ctx, hook, event.wire())
        if needs_enqueue and webhooks.is_paused(hook):
            await webhooks.hold_new(ctx, hook, delivery["_id"])
            log.info("webhook.held", delivery_id=delivery["_id"])
        elif needs_enqueue:
            await ctx.send(deliver_webhook, delivery["_id"], delivery["generation"], hook["owner"])
            await webhooks.mark_enqueued(ctx, delivery["_id"])
            log.info("webhook.enqueued", delivery_id=delivery["_id"])


async def deliver_webhook(
    ctx: ActorContext, delivery_id: str, generation: int = 0, owner: str | None = None
) -> None:
    """POST one delivery; raises :class:`DeliveryFailed` (retried) when it fails, and
    :class:`Deferred` when its owner already has as many deliveries in flight as allowed or
    another message holds the delivery's live lease.

    ``owner`` (the fan-out names it) spares reading the delivery before looking at the
    owner's slots; without it (messages sent by a redelivery or an older release) it is read."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(delivery_id=delivery_id, generation=generation)
    if owner is None:
        head = await ctx.store["webhook_deliveries"].find_one({"_id": delivery_id}, {"owner": 1})
        if head is None:
            log.info("webhook.skipped", reason="gone")
            return
        owner = str(head["owner"])
    holder = lease_holder(ctx.broker)
    slot = Slot(ctx, owner, holder)
    if await webhooks.slots_in_use(ctx, owner) >= ctx.settings.webhook_max_in_flight_per_user:
        await slot.take()  # before any read or write: deferred, it cost MongoDB nothing
    try:
        await _deliver(ctx, delivery_id, generation, holder, slot)
    finally:
        await slot.free()


@dataclass
class Slot:
    """One of ``owner``'s in-flight slots for one message: taken at most once, given back
    once (``token`` while held)."""

    ctx: Context
    owner: str
    holder: webhooks.Holder | None
    token: str | None = None

    async def take(self, wait: float = 0.0) -> None:
        """Hold a slot (a no-op while one is held), looking again every 10 - 20 ms for up to
        ``wait`` seconds; :class:`Deferred` when all are still taken."""
        if self.token is not None:
            return
        token = webhooks.slot_token(self.holder)
        ttl = _lease(self.ctx.settings)
        deadline = time.monotonic() + wait
        while not await webhooks.take_slot(self.ctx, self.owner, token, ttl, holder=self.holder):
            if time.monotonic() >= deadline:
                delay = DEFER_MS + random.randint(0, DEFER_MS)  # noqa: S311 (jitter)
                log.debug("webhook.deferred", owner=self.owner, delay_ms=delay)
                raise Deferred("the owner's deliveries in flight are at the cap", delay=delay)
            await asyncio.sleep(random.uniform(0.01, 0.02))  # noqa: S311
        self.token = token

    async def free(self) -> None:
        """Give the slot back, if one is held."""
        if self.token is not None:
            token, self.token = self.token, None
            await webhooks.free_slot(self.ctx, self.owner, token)


async def _deliver(
    ctx: Context, delivery_id: str, generation: int, holder: webhooks.Holder | None, slot: Slot
) -> None:
    claimed = await webhooks.claim(ctx, delivery_id, generation, _lease(ctx.settings), holder)
    if claimed == "busy":
        # Another message is attempting it right now (its worker is beating): look again when
        # it has likely finished; waiting spends no retry.
        delay = LEASE_WAIT_MS + random.randint(0, LEASE_WAIT_MS // 2)  # noqa: S311
        log.debug("webhook.lease_wait", delay_ms=delay)
        raise Deferred("the delivery is being attempted by another message", delay=delay)
    if claimed is None:
        log.info("webhook.skipped", reason="gone, stale or already succeeded")
        return
    delivery, token = claimed.delivery, claimed.token
    if claimed.took_over is not None:
        log.warning("webhook.lease_taken_over", interrupted=claimed.took_over)
    try:
        hook = await ctx.store["webhooks"].find_one(
            {"_id": ObjectId(delivery["webhook_id"]), "owner": delivery["owner"]}
        )
        if hook is None:
            await webhooks.forget(ctx, delivery_id)
            log.info("webhook.gone")
            return
        if webhooks.is_paused(hook):
            await webhooks.hold(ctx, hook, delivery_id, token)
            log.info("webhook.held")
            return
        # Leased already: a slot freed within SLOT_WAIT_S (fast receivers answer in
        # milliseconds) is worth waiting for rather than giving the lease back; deferred, the
        # lease is given back below.
        await slot.take(wait=SLOT_WAIT_S)
        try:
            attempt = await attempt_delivery(ctx.settings, hook, delivery)
        finally:
            await slot.free()
    except DeliveryRefused as exc:
        await webhooks.record_attempt(
            ctx, delivery_id, token, Attempt(ok=False, error=str(exc)), "dead"
        )
        log.warning("webhook.refused", error=str(exc))
        raise
    except BaseException:
        await webhooks.release(ctx, delivery_id, token)
        raise
    status: webhooks.DeliveryStatus = "succeeded" if attempt.ok else "failed"
    if not await webhooks.record_attempt(ctx, delivery_id, token, attempt, status):
        log.info("webhook.superseded", status=status)
        return
    log.info("webhook.attempted", status=status, response_code=attempt.response_code)
    if await webhooks.note_outcome(ctx, hook, attempt):
        log.warning("webhook.paused", webhook_id=str(hook["_id"]), error=attempt.error)
    if not attempt.ok:
        raise DeliveryFailed(f"delivery {delivery_id}: {attempt.error}")


async def webhook_delivery_exhausted(
    ctx: ActorContext, message: dict[str, Any], retry_info: Any
) -> None:
    """Dramatiq gave up on a ``deliver_webhook`` message: its delivery is ``dead``."""
    args = message.get("args") or []
    if not args:
        return
    delivery_id = str(args[0])
    generation = int(args[1]) if len(args) > 1 else 0
    if await webhooks.mark_dead(ctx, delivery_id, generation):
        log.warning("webhook.dead", delivery_id=delivery_id, retry_info=retry_info)


async def redeliver_webhook(ctx: ActorContext, event: WebhookRedeliveryEvent) -> None:
    """A user asked for a delivery again (API): enqueue an attempt of its new generation."""
    await ctx.send(deliver_webhook, event.data.delivery_id, event.data.generation)
