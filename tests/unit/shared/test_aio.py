"""shared/aio.py: stopping background loops even when a library swallows a cancellation."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from shared.aio import cancel_and_wait, wait_set


async def test_wait_set_keeps_a_cancellation_that_arrives_with_the_event() -> None:
    # On 3.11, asyncio.wait_for(event.wait(), t) returns True here and the cancel is lost.
    event = asyncio.Event()
    task = asyncio.create_task(wait_set(event, 10))
    await asyncio.sleep(0)  # the task is waiting on the event
    event.set()
    task.cancel()  # same loop iteration as the set
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_wait_set_reports_set_and_timeout() -> None:
    event = asyncio.Event()
    assert await wait_set(event, 0.01) is False
    event.set()
    assert await wait_set(event, 0.01) is True


async def test_cancel_and_wait_ends_a_loop_that_swallowed_a_cancellation() -> None:
    swallowed = 0

    async def stubborn_loop() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed == 0:
                    swallowed += 1
                    continue  # what a library did under the relay's loop
                raise

    task = asyncio.create_task(stubborn_loop())
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await cancel_and_wait(task, retry_s=0.05)
    assert task.cancelled()
    assert swallowed == 1


async def test_cancel_and_wait_takes_none_finished_and_failed_tasks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    failed = asyncio.create_task(fails(), name="fails")
    done = asyncio.create_task(asyncio.sleep(0))
    with contextlib.suppress(RuntimeError):
        await failed
    await done
    await cancel_and_wait(None, failed, done)
    assert "fails ended with RuntimeError('boom')" in caplog.text
