"""What actors work with: a :class:`~core.context.Context` (opened by
:func:`core.context.open_context` on the worker's event loop on first use, since PyMongo's async
client belongs to one loop, and closed at worker shutdown) and a mailer."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import dramatiq
from dramatiq.asyncio import get_event_loop_thread

from config.connections import Connections
from core.context import Context, open_context
from core.mail import Mailer, build_mailer


class WorkerResources(dramatiq.Middleware):
    """Lazily opened handles for async actors; a middleware so it closes with the worker."""

    def __init__(self, connections: Connections):
        self.connections = connections
        self.settings = connections.settings
        self._ctx: Context | None = None
        self._open: AsyncExitStack | None = None
        self._lock: asyncio.Lock | None = None
        self.mailer: Mailer = build_mailer(self.settings.smtp_url)
        #: The broker these resources serve (set by ``build_broker``), so an actor can enqueue
        #: another actor's messages by name.
        self.broker: dramatiq.Broker | None = None

    async def context(self) -> Context:
        """The context for the running loop (opened on first use)."""
        if self._ctx is None:
            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                if self._ctx is None:
                    stack = AsyncExitStack()
                    self._ctx = await stack.enter_async_context(
                        open_context(self.settings, self.connections)
                    )
                    self._open = stack
        return self._ctx

    async def aclose(self) -> None:
        """Close the clients (on the loop that made them)."""
        if self._open is not None:
            stack, self._open, self._ctx = self._open, None, None
            await stack.aclose()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """Close clients once in-flight actors are done. ``after_*`` hooks run in reverse
        order of the middleware, so this runs before AsyncIO's stops the event loop."""
        thread = get_event_loop_thread()
        if thread is not None and self._ctx is not None:
            thread.run_coroutine(self.aclose())
