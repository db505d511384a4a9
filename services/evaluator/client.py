"""The port to a deployment: one chat completion from any OpenAI-compatible server (vLLM, the
gateway, a hosted API). Deterministic sampling (temperature 0, fixed seed) so a re-run of a
benchmark asks the same questions the same way.

Failures are classified, never raised raw: ``unreachable`` and ``timeout`` are transport
failures (the deployment may be gone), ``http`` carries the status, ``protocol`` means the
server answered something that is not a chat completion. Hostile answers (huge bodies,
invalid UTF-8, lone surrogates) are bounded and cleaned here, before anything scores them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import aiohttp

ErrorKind = Literal["unreachable", "timeout", "http", "protocol", "oversized", "skipped"]
TRANSPORT_ERRORS: frozenset[str] = frozenset({"unreachable", "timeout", "skipped"})


@dataclass(frozen=True)
class Completion:
    text: str
    latency_ms: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None


class EndpointError(Exception):
    def __init__(self, kind: ErrorKind, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.status = status

    @property
    def retryable(self) -> bool:
        if self.kind == "http":
            return self.status is not None and (self.status == 429 or self.status >= 500)
        return self.kind in ("unreachable", "timeout")

    @property
    def transport(self) -> bool:
        return self.kind in TRANSPORT_ERRORS


class ChatClient(Protocol):
    async def complete(self, messages: list[dict[str, str]], *, max_tokens: int) -> Completion: ...


def chat_url(endpoint: str) -> str:
    """``http://host:port``, ``.../v1`` or the full ``.../v1/chat/completions`` all work."""
    base = endpoint.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    if base.endswith("/v1"):
        return base + "/chat/completions"
    return base + "/v1/chat/completions"


def clean_text(text: str) -> str:
    """Valid UTF-8 whatever the server sent (lone surrogates from JSON escapes become '?')."""
    return text.encode("utf-8", errors="replace").decode("utf-8")


class OpenAIChatClient:
    """aiohttp, one pooled session per client; close it with :meth:`close`."""

    def __init__(
        self,
        endpoint: str,
        model: str,
        *,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 5.0,
        temperature: float = 0.0,
        seed: int = 0,
        max_response_bytes: int = 4 * 1024 * 1024,
        api_key: str | None = None,
        pool_size: int = 64,
    ) -> None:
        self.url = chat_url(endpoint)
        self.model = model
        self.temperature = temperature
        self.seed = seed
        self.max_response_bytes = max_response_bytes
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect_timeout_s)
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._pool_size),
                timeout=self._timeout,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> OpenAIChatClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def complete(self, messages: list[dict[str, str]], *, max_tokens: int) -> Completion:
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "top_p": 1.0,
            "seed": self.seed,
            "n": 1,
            "stream": False,
        }
        started = time.perf_counter()
        try:
            async with self._get_session().post(
                self.url, data=json.dumps(body), headers=self._headers
            ) as resp:
                raw = await self._read_bounded(resp)
                status = resp.status
        except EndpointError:
            raise
        except TimeoutError as exc:
            raise EndpointError("timeout", f"no answer within {self._timeout.total}s") from exc
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError) as exc:
            raise EndpointError("unreachable", f"{type(exc).__name__}: {exc}"[:500]) from exc
        latency_ms = (time.perf_counter() - started) * 1000.0
        text = raw.decode("utf-8", errors="replace")
        if status != 200:
            raise EndpointError("http", f"HTTP {status}: {clean_text(text[:300])}", status=status)
        return _parse_completion(text, latency_ms)

    async def _read_bounded(self, resp: aiohttp.ClientResponse) -> bytes:
        declared = resp.content_length
        if declared is not None and declared > self.max_response_bytes:
            raise EndpointError(
                "oversized", f"response of {declared} bytes exceeds {self.max_response_bytes}"
            )
        if declared is not None:
            return await resp.read()  # bounded by the check above: one read, no copies
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > self.max_response_bytes:
                raise EndpointError(
                    "oversized", f"response exceeds {self.max_response_bytes} bytes"
                )
            chunks.append(chunk)
        return b"".join(chunks)


def _parse_completion(text: str, latency_ms: float) -> Completion:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise EndpointError(
            "protocol", f"response is not JSON: {clean_text(text[:120])!r}"
        ) from exc
    try:
        choice = data["choices"][0]
        content = choice["message"].get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise TypeError(f"content is {type(content).__name__}")
        usage: dict[str, Any] = data.get("usage") or {}
        return Completion(
            text=clean_text(content),
            latency_ms=latency_ms,
            prompt_tokens=_count(usage.get("prompt_tokens")),
            completion_tokens=_count(usage.get("completion_tokens")),
            finish_reason=str(choice.get("finish_reason"))[:40]
            if choice.get("finish_reason")
            else None,
        )
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise EndpointError("protocol", f"not a chat completion: {exc!r}"[:300]) from exc


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
