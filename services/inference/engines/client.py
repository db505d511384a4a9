"""Talking to a running engine over its OpenAI-compatible HTTP API: readiness (the model is
listed *and* a smoke completion returns text) and LoRA hot-loading (vLLM's runtime API)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp

# Bodies we read from an engine are small JSON; refuse anything absurd.
MAX_BODY_BYTES = 4 * 1024 * 1024


class EngineError(RuntimeError):
    pass


class EngineClient:
    def __init__(self, *, request_timeout_s: float = 30.0) -> None:
        self.request_timeout_s = request_timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.request_timeout_s)
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _json(self, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
        session = await self.session()
        async with session.request(method, url, **kwargs) as resp:
            chunks: list[bytes] = []
            size = 0
            async for chunk in resp.content.iter_chunked(64 * 1024):
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise EngineError(f"{url}: response larger than {MAX_BODY_BYTES} bytes")
                chunks.append(chunk)
            body = b"".join(chunks)
            try:
                return resp.status, json.loads(body) if body else None
            except ValueError:
                return resp.status, body.decode(errors="replace")[:2000]

    async def models(self, endpoint: str) -> list[str]:
        """The model names an engine serves (``GET /v1/models``); [] if it is not answering."""
        try:
            status, body = await self._json("GET", f"{endpoint}/models")
        except (aiohttp.ClientError, TimeoutError, EngineError):
            return []
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("data"), list):
            return []
        return [str(m.get("id")) for m in body["data"] if isinstance(m, dict)]

    async def smoke(self, endpoint: str, model: str, *, vllm: bool = True) -> str:
        """One short completion; returns its text (raises if the engine errs)."""
        payload: dict[str, Any] = {
            "model": model,
            "prompt": "Hello",
            "max_tokens": 8,
            "temperature": 0,
        }
        if vllm:
            payload["min_tokens"] = 1  # a random-init test model may emit EOS first
        status, body = await self._json("POST", f"{endpoint}/completions", json=payload)
        if status != 200 or not isinstance(body, dict):
            raise EngineError(f"smoke completion: HTTP {status}: {str(body)[:500]}")
        try:
            return str(body["choices"][0]["text"])
        except (KeyError, IndexError, TypeError) as exc:
            raise EngineError(f"smoke completion: unexpected body {str(body)[:500]}") from exc

    async def wait_ready(
        self,
        endpoint: str,
        model: str,
        *,
        timeout_s: float,
        smoke_timeout_s: float,
        alive: Callable[[], bool] = lambda: True,
        vllm: bool = True,
        poll_s: float = 0.5,
    ) -> tuple[float, float]:
        """Ready = ``/v1/models`` lists ``model`` and a smoke completion returns non-empty text.

        Returns the seconds each step took. Raises :class:`EngineError` when the engine dies,
        or either step misses its deadline.
        """
        started = time.monotonic()
        deadline = started + timeout_s
        while True:
            if not alive():
                raise EngineError("engine process exited before it was ready")
            if model in await self.models(endpoint):
                break
            if time.monotonic() > deadline:
                raise EngineError(f"{endpoint} did not list {model!r} within {timeout_s:.0f}s")
            await asyncio.sleep(poll_s)
        listed = time.monotonic()
        smoke_deadline = listed + smoke_timeout_s
        last: Exception | None = None
        while time.monotonic() < smoke_deadline:
            if not alive():
                raise EngineError("engine process exited during the smoke completion")
            try:
                text = await asyncio.wait_for(
                    self.smoke(endpoint, model, vllm=vllm),
                    max(smoke_deadline - time.monotonic(), 0.1),
                )
            except (aiohttp.ClientError, TimeoutError, EngineError) as exc:
                last = exc
                await asyncio.sleep(poll_s)
                continue
            if text.strip():
                return listed - started, time.monotonic() - listed
            last = EngineError("smoke completion returned empty text")
            await asyncio.sleep(poll_s)
        raise EngineError(f"smoke completion failed within {smoke_timeout_s:.0f}s: {last}")

    async def load_lora(self, endpoint: str, name: str, path: str) -> None:
        status, body = await self._json(
            "POST", f"{endpoint}/load_lora_adapter", json={"lora_name": name, "lora_path": path}
        )
        if status != 200:
            raise EngineError(f"load_lora_adapter {name!r}: HTTP {status}: {str(body)[:1000]}")

    async def unload_lora(self, endpoint: str, name: str) -> None:
        status, body = await self._json(
            "POST", f"{endpoint}/unload_lora_adapter", json={"lora_name": name}
        )
        if status not in (200, 404):
            raise EngineError(f"unload_lora_adapter {name!r}: HTTP {status}: {str(body)[:1000]}")
