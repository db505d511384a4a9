"""Test-side views of the broker, through plain nats-py (independent of shared/bus.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats
from nats.aio.msg import Msg


async def read_stream(nats_url: str, stream: str, subject: str | None = None) -> list[Msg]:
    """Every message currently stored in ``stream`` (optionally one subject filter)."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        out: list[Msg] = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                raw = await js.get_msg(stream, seq)
            except Exception:  # deleted / purged
                continue
            if subject is None or raw.subject == subject:
                out.append(raw)  # type: ignore[arg-type]
        return out
    finally:
        await nc.close()


async def eventually(
    check: Callable[[], Any] | Callable[[], Awaitable[Any]],
    *,
    timeout_s: float = 15.0,
    interval_s: float = 0.05,
    what: str = "condition",
) -> Any:
    """Poll until ``check()`` is truthy; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(interval_s)
