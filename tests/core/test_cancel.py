"""Background loops stop when asked even if a library swallowed the cancellation (core/cancel.py).

The swallowing call below does what Python 3.11's ``asyncio.wait_for`` does when the
cancellation arrives as its inner awaitable completes (PyMongo awaits it on its connect, send
and server-selection paths): the ``CancelledError`` is dropped. Seen in CI as an application
clean-up waiting for ever on its outbox relay while MongoDB was down."""

from __future__ import annotations

import asyncio
import contextlib
import time

from core import cancel


async def swallowing_call() -> None:
    with contextlib.suppress(asyncio.CancelledError):  # lost, as 3.11's wait_for loses it
        await asyncio.sleep(0.02)


async def test_a_loop_pausing_through_cancel_stops_after_a_swallowed_cancellation() -> None:
    rounds = 0

    async def loop() -> None:
        nonlocal rounds
        while True:
            rounds += 1
            await swallowing_call()
            await cancel.pause(0.01)

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.1)
    assert await cancel.stop(task, 2)
    assert task.cancelled()
    seen = rounds
    await asyncio.sleep(0.1)
    assert rounds == seen


async def test_stop_is_bounded_when_the_task_carries_on() -> None:
    done = False

    async def deaf() -> None:  # a loop with no checkpoint: every cancellation is lost
        while not done:
            await swallowing_call()

    task = asyncio.create_task(deaf())
    await asyncio.sleep(0.05)
    began = time.monotonic()
    assert not await cancel.stop(task, 0.3)
    assert 0.3 <= time.monotonic() - began < 2
    assert not task.done()  # still going: only its own flag ends it now
    done = True
    await asyncio.wait({task}, timeout=2)
    assert task.done()


async def test_stop_without_cancelling_waits_for_a_task_asked_another_way() -> None:
    stopping = asyncio.Event()

    async def polite() -> str:
        await stopping.wait()
        return "finished its pass"

    task = asyncio.create_task(polite())
    stopping.set()
    assert await cancel.stop(task, 2, cancel=False)
    assert task.result() == "finished its pass"
