"""Fakes of the evaluator's ports for unit tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from services.evaluator.client import Completion, EndpointError


class FakeChat:
    """A ChatClient that answers with ``answer(messages)`` (a str, or raises)."""

    def __init__(self, answer: Callable[[list[dict[str, str]]], str], delay_s: float = 0.0):
        self.answer = answer
        self.delay_s = delay_s
        self.calls = 0
        self.in_flight = 0
        self.max_in_flight = 0

    async def complete(self, messages: list[dict[str, str]], *, max_tokens: int) -> Completion:
        self.calls += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
            text = self.answer(messages)
        finally:
            self.in_flight -= 1
        return Completion(text=text, latency_ms=10.0, prompt_tokens=5, completion_tokens=7)


def failing(kind: Any, message: str = "boom", status: int | None = None) -> Callable[..., str]:
    def answer(_messages: list[dict[str, str]]) -> str:
        raise EndpointError(kind, message, status=status)

    return answer
