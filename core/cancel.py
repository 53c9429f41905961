"""Background loops that stop when asked, even when a library swallowed the request.

On Python 3.11 ``asyncio.wait_for`` returns the inner result when a cancellation arrives just
as the inner awaitable completes, and the ``CancelledError`` is lost (fixed in 3.12, where
``wait_for`` is built on ``asyncio.timeout``). PyMongo's async driver awaits ``wait_for`` on its
connect, send and server-selection paths, so a task cancelled while MongoDB is unreachable
(every call failing fast, the server monitor waking the selection loop) can carry on as if
nothing was asked: seen in CI as an application clean-up that waited for ever on its outbox
relay. Worse, 3.11's ``wait_for`` on timeout cancels its inner task and then waits for it
without bound.

The task still counts the request (``Task.cancelling()``). So every background loop goes
through :func:`pause` (or :func:`checkpoint`) between rounds, which raises ``CancelledError``
once a cancellation was requested, swallowed or not; and clean-ups stop tasks with
:func:`stop`, bounded whatever the task does.
"""

from __future__ import annotations

import asyncio
from typing import Any

from config.logging import get_logger

log = get_logger(__name__)


def checkpoint() -> None:
    """Raise ``CancelledError`` if the current task was asked to stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def pause(seconds: float) -> None:
    """``asyncio.sleep(seconds)`` after a :func:`checkpoint`."""
    checkpoint()
    await asyncio.sleep(seconds)


async def stop(task: asyncio.Task[Any], within: float, *, cancel: bool = True) -> bool:
    """Cancel ``task`` (unless ``cancel`` is false: it was asked to stop another way) and wait
    at most ``within`` seconds for it to end; whether it ended. One that did not is logged
    and left to end with its loop (``asyncio.wait`` neither raises nor cancels on time-out,
    unlike 3.11's ``wait_for``, which waits for the cancelled task without bound)."""
    if cancel:
        task.cancel()
    done, _ = await asyncio.wait({task}, timeout=within)
    if not done:
        log.warning("task.did_not_stop", task=task.get_name(), waited_s=within)
        return False
    if not task.cancelled() and task.exception() is not None:
        log.error("task.failed", task=task.get_name(), error=repr(task.exception()))
    return True
