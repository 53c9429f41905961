"""Separate worker pools in one process: webhook deliveries never take the other actors' threads.

``taskmanager run`` (the all-in-one mode) serves every queue from one process. With a single
Dramatiq ``Worker`` all actors share its threads, and an async actor holds its thread until it
finishes: a few slow webhook receivers fill every thread, and search, cache, notifications and
analytics wait behind them. :class:`WorkerPools` runs one ``Worker`` for the webhook queues and
one for the rest, each with threads of its own.

Dramatiq expects one ``Worker`` per process: the broker's middleware hears ``worker_boot`` and
``worker_shutdown`` once and sets up per-process state then (the AsyncIO middleware's event loop
thread, our heartbeat registration, the actors' resources). So the first pool is a plain
``Worker`` and emits those signals for the process, while the others see the broker through
:class:`_QuietBroker`, which passes everything on except those four signals; the others start
after the first and stop before it. The heartbeat registration is then widened to name every
pool's queues and threads. ``consumer_thread_boot`` passes through, so pausing a queue
(:mod:`workers.pause`, which wraps each consumer thread's view of the broker then) works in
every pool.
"""

from __future__ import annotations

from typing import Any, cast

import dramatiq

from workers.broker import WEBHOOK_QUEUES, general_queues
from workers.heartbeat import WorkerHeartbeat

_PROCESS_SIGNALS = frozenset({"worker_boot", "worker_shutdown"})


class _QuietBroker:
    """A broker as a secondary pool sees it: the per-process signals are not emitted again."""

    def __init__(self, broker: dramatiq.Broker):
        self._broker = broker

    def __getattr__(self, name: str) -> Any:
        return getattr(self._broker, name)

    def emit_before(self, signal: str, *args: Any, **kwargs: Any) -> None:
        """Pass on every signal but ``worker_boot``/``worker_shutdown``."""
        if signal not in _PROCESS_SIGNALS:
            self._broker.emit_before(signal, *args, **kwargs)

    def emit_after(self, signal: str, *args: Any, **kwargs: Any) -> None:
        """Pass on every signal but ``worker_boot``/``worker_shutdown``."""
        if signal not in _PROCESS_SIGNALS:
            self._broker.emit_after(signal, *args, **kwargs)


class WorkerPools:
    """Several Dramatiq workers over one broker in one process, each with its own threads and
    queues; started and stopped as one (``start()``/``stop()`` like a ``Worker``)."""

    def __init__(
        self,
        broker: dramatiq.Broker,
        pools: list[tuple[set[str], int]],
        *,
        worker_timeout: int = 1000,
    ):
        if not pools or any(not queues for queues, _ in pools):
            raise ValueError("every pool needs at least one queue")
        self.broker = broker
        self.workers: list[dramatiq.Worker] = []
        for index, (queues, threads) in enumerate(pools):
            seen_as = broker if index == 0 else cast(dramatiq.Broker, _QuietBroker(broker))
            self.workers.append(
                dramatiq.Worker(
                    seen_as, queues=queues, worker_threads=threads, worker_timeout=worker_timeout
                )
            )

    @classmethod
    def split(
        cls,
        broker: dramatiq.Broker,
        *,
        threads: int,
        webhook_threads: int,
        worker_timeout: int = 1000,
    ) -> WorkerPools:
        """The default split: every queue but the webhook ones on ``threads`` threads, the
        webhook queues on ``webhook_threads`` threads of their own."""
        return cls(
            broker,
            [(general_queues(broker), threads), (set(WEBHOOK_QUEUES), webhook_threads)],
            worker_timeout=worker_timeout,
        )

    @property
    def worker_threads(self) -> int:
        """Threads of every pool together."""
        return sum(worker.worker_threads for worker in self.workers)

    def start(self) -> None:
        """Start the first pool (it boots the process's middleware), then the others."""
        for worker in self.workers:
            worker.start()
        queues = sorted({q for w in self.workers for q in (w.consumer_whitelist or ())})
        for middleware in self.broker.middleware:
            if isinstance(middleware, WorkerHeartbeat):
                middleware.queues = queues
                middleware.threads = self.worker_threads

    def stop(self, timeout: int = 600_000) -> None:
        """Stop the other pools, then the first (it shuts the process's middleware down)."""
        for worker in reversed(self.workers):
            worker.stop(timeout)

    def join(self) -> None:
        """Wait until every pool's queues are idle (for tests)."""
        for worker in self.workers:
            worker.join()
