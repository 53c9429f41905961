"""What actors work with: a :class:`~core.context.Context` and a mailer, built lazily on the
worker's event loop (PyMongo's async client belongs to one loop) and closed at shutdown."""

from __future__ import annotations

import asyncio

import dramatiq
from dramatiq.asyncio import get_event_loop_thread

from config.connections import Connections
from core.context import Context
from core.mail import Mailer, build_mailer
from core.store import Store


class WorkerResources(dramatiq.Middleware):
    """Lazily opened handles for async actors; a middleware so it closes with the worker."""

    def __init__(self, connections: Connections):
        self.connections = connections
        self.settings = connections.settings
        self._ctx: Context | None = None
        self._lock: asyncio.Lock | None = None
        self.mailer: Mailer = build_mailer(self.settings.smtp_url)
        #: The broker these resources serve (set by ``build_broker``), so an actor can enqueue
        #: another actor's messages by name.
        self.broker: dramatiq.Broker | None = None

    async def context(self) -> Context:
        """The context for the running loop (created on first use)."""
        if self._ctx is None:
            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                if self._ctx is None:
                    store = Store(self.connections.mongo(), self.settings.mongodb_db)
                    self._ctx = Context(self.settings, store, self.connections.redis())
        return self._ctx

    async def aclose(self) -> None:
        """Close the clients (on the loop that made them)."""
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            await ctx.store.client.close()
            await ctx.redis.aclose()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """Close clients once in-flight actors are done. ``after_*`` hooks run in reverse
        order of the middleware, so this runs before AsyncIO's stops the event loop."""
        thread = get_event_loop_thread()
        if thread is not None and self._ctx is not None:
            thread.run_coroutine(self.aclose())
