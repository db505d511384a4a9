"""Small asyncio helpers that are easy to get subtly wrong."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)


async def wait_set(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until ``event`` is set or ``timeout_s`` passes; True if it was set.

    Use this, not ``asyncio.wait_for(event.wait(), ...)``, in any loop that is stopped by
    cancelling it: on Python 3.11, ``wait_for`` swallows a cancellation that arrives just as
    the event is set (CPython gh-86296, fixed in 3.12), and the loop then never stops. That
    hung the outbox relay's ``stop()`` (so a service's shutdown) about once in ten stops
    right after a commit. ``asyncio.timeout`` tells its own timeout from a cancellation.
    """
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None, retry_s: float = 2.0) -> None:
    """Cancel ``tasks`` and return once every one of them has really ended.

    One ``task.cancel()`` is not enough for a background loop: a library can swallow a
    cancellation that lands at the wrong moment (``asyncio.wait_for`` on 3.11 when its future
    completes at the same time, as in nats-py's request; SQLAlchemy's pool while it resets a
    connection), the loop then runs on, and ``await task`` waits forever. So cancel again
    every ``retry_s`` until it is done. Errors the tasks ended with are logged, not raised.
    """
    pending = {t for t in tasks if t is not None}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=retry_s)
    for ended in tasks:
        if ended is not None and not ended.cancelled() and ended.exception() is not None:
            log.warning("task %s ended with %r", ended.get_name(), ended.exception())
