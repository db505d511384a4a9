"""The HTTP adapter against a local server that misbehaves on purpose."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from aiohttp import web

from services.evaluator.client import EndpointError, OpenAIChatClient, chat_url
from shared.embedded import free_port


def completion(content: str) -> dict:
    return {
        "choices": [
            {"message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 11, "completion_tokens": 3},
    }


@pytest_asyncio.fixture
async def upstream() -> AsyncIterator[tuple[str, list[dict]]]:
    seen: list[dict] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append(body)
        mode = body["messages"][-1]["content"]
        if mode == "ok":
            return web.json_response(completion("hello"))
        if mode == "500":
            return web.Response(status=500, text="engine crashed")
        if mode == "404":
            return web.Response(status=404, text="model not found")
        if mode == "huge":
            return web.json_response(completion("x" * 3_000_000))
        if mode == "huge-chunked":
            resp = web.StreamResponse()
            await resp.prepare(request)
            for _ in range(100):
                await resp.write(b"x" * 65536)
            return resp
        if mode == "bad-utf8":
            raw = b'{"choices": [{"message": {"content": "caf\xe9 \xff ok"}}]}'
            return web.Response(body=raw, content_type="application/json")
        if mode == "surrogate":
            raw = b'{"choices": [{"message": {"content": "a\\ud800b"}}]}'
            return web.Response(body=raw, content_type="application/json")
        if mode == "not-json":
            return web.Response(text="<html>proxy error</html>")
        if mode == "no-choices":
            return web.json_response({"object": "chat.completion", "choices": []})
        if mode == "null-content":
            return web.json_response({"choices": [{"message": {"content": None}}]})
        if mode == "slow":
            await asyncio.sleep(2)
            return web.json_response(completion("late"))
        raise AssertionError(mode)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    yield f"http://127.0.0.1:{port}", seen
    await runner.cleanup()


def ask(mode: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": mode}]


def test_chat_url_accepts_the_usual_spellings():
    assert chat_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_url("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"


async def test_a_completion_with_deterministic_sampling(upstream):
    url, seen = upstream
    async with OpenAIChatClient(url + "/v1", "m", seed=7) as client:
        out = await client.complete(ask("ok"), max_tokens=5)
    assert (out.text, out.prompt_tokens, out.completion_tokens) == ("hello", 11, 3)
    assert out.latency_ms > 0 and out.finish_reason == "stop"
    assert seen[0]["temperature"] == 0.0 and seen[0]["seed"] == 7 and seen[0]["model"] == "m"
    assert seen[0]["max_tokens"] == 5 and seen[0]["stream"] is False


@pytest.mark.parametrize(
    ("mode", "kind", "retryable"),
    [
        ("500", "http", True),
        ("404", "http", False),
        ("huge", "oversized", False),
        ("huge-chunked", "oversized", False),
        ("not-json", "protocol", False),
        ("no-choices", "protocol", False),
        ("slow", "timeout", True),
    ],
)
async def test_failures_are_classified(upstream, mode, kind, retryable):
    url, _ = upstream
    async with OpenAIChatClient(url, "m", timeout_s=1.0, max_response_bytes=1_000_000) as client:
        with pytest.raises(EndpointError) as err:
            await client.complete(ask(mode), max_tokens=5)
    assert err.value.kind == kind and err.value.retryable is retryable


async def test_hostile_bytes_become_clean_text(upstream):
    url, _ = upstream
    async with OpenAIChatClient(url, "m") as client:
        bad = await client.complete(ask("bad-utf8"), max_tokens=5)
        sur = await client.complete(ask("surrogate"), max_tokens=5)
        empty = await client.complete(ask("null-content"), max_tokens=5)
    assert bad.text == "caf\ufffd \ufffd ok"
    assert sur.text == "a?b"
    json.dumps(sur.text).encode("utf-8")
    sur.text.encode("utf-8")  # no lone surrogate left
    assert empty.text == ""


async def test_nothing_listening_is_unreachable():
    async with OpenAIChatClient(f"http://127.0.0.1:{free_port()}", "m") as client:
        with pytest.raises(EndpointError) as err:
            await client.complete(ask("ok"), max_tokens=5)
    assert err.value.kind == "unreachable" and err.value.transport and err.value.retryable
