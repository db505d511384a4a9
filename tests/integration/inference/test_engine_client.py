"""The readiness checks and LoRA calls against an HTTP server that misbehaves on purpose
(oversized, malformed and hostile bodies, empty completions, errors)."""

from __future__ import annotations

import pytest
from aiohttp import web

from services.inference.engines.client import MAX_BODY_BYTES, EngineClient, EngineError

pytestmark = pytest.mark.integration


@pytest.fixture
async def upstream():
    state = {"models": {"data": [{"id": "m"}]}, "text": "hi", "status": 200, "raw": None}

    async def models(request: web.Request) -> web.StreamResponse:
        if state["raw"] is not None:
            return web.Response(body=state["raw"], content_type="application/json")
        return web.json_response(state["models"])

    async def completions(request: web.Request) -> web.StreamResponse:
        if state["status"] != 200:
            return web.json_response({"error": "boom"}, status=state["status"])
        return web.json_response({"choices": [{"text": state["text"]}]})

    async def load(request: web.Request) -> web.StreamResponse:
        return web.Response(status=400, text="The lora adapter has already been loaded")

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/load_lora_adapter", load)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/v1", state
    await runner.cleanup()


async def test_ready_when_listed_and_the_smoke_completion_has_text(upstream):
    endpoint, _ = upstream
    client = EngineClient()
    listed_s, smoke_s = await client.wait_ready(
        endpoint, "m", timeout_s=5, smoke_timeout_s=5, poll_s=0.05
    )
    assert listed_s >= 0 and smoke_s >= 0
    await client.close()


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b'{"data": "not a list"}',
        b'{"data": [1, "x", null]}',
        b"[]",
        b'{"data": [{"id": "m"}]}' + b" " * (MAX_BODY_BYTES + 10),
    ],
)
async def test_malformed_or_oversized_model_lists_mean_not_ready(upstream, raw):
    endpoint, state = upstream
    state["raw"] = raw
    client = EngineClient()
    assert await client.models(endpoint) == []
    with pytest.raises(EngineError, match="did not list"):
        await client.wait_ready(endpoint, "m", timeout_s=0.3, smoke_timeout_s=1, poll_s=0.05)
    await client.close()


async def test_empty_or_failing_smoke_completions_are_not_ready(upstream):
    endpoint, state = upstream
    client = EngineClient()
    state["text"] = "   "
    with pytest.raises(EngineError, match="empty text"):
        await client.wait_ready(endpoint, "m", timeout_s=2, smoke_timeout_s=0.3, poll_s=0.05)
    state["status"] = 500
    with pytest.raises(EngineError, match="HTTP 500"):
        await client.wait_ready(endpoint, "m", timeout_s=2, smoke_timeout_s=0.3, poll_s=0.05)
    await client.close()


async def test_a_dead_engine_or_nothing_listening_fails_fast(upstream):
    endpoint, _ = upstream
    client = EngineClient()
    with pytest.raises(EngineError, match="exited"):
        await client.wait_ready(endpoint, "m", timeout_s=5, smoke_timeout_s=5, alive=lambda: False)
    assert await client.models("http://127.0.0.1:9/v1") == []
    with pytest.raises(EngineError, match="load_lora_adapter"):
        await client.load_lora(endpoint, "x", "/nowhere")
    await client.close()
