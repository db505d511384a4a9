"""A scripted OpenAI-compatible upstream for the gateway's failure-injection tests and bench.

In tests it runs in-process (``await FakeUpstream(...).start()``) so a test can switch its
behaviour (fail with a status, be slow, hang, drop the connection, break mid-stream) and count
calls and cancellations. ``python -m tests.integration.gateway.fake_upstream PORT`` serves it
alone (the benchmark's fast upstream).
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from typing import Any

import orjson
from aiohttp import web


class FakeUpstream:
    def __init__(
        self, name: str = "tuneloop", *, tag: str = "up", max_model_len: int = 512
    ) -> None:
        self.name = name
        self.tag = tag
        self.max_model_len = max_model_len
        self.fail_status: int | None = None
        self.fail_next = 0  # fail this many calls with 503, then answer
        self.delay_s = 0.0
        self.hang = False
        self.drop_connection = False
        self.break_mid_stream = False
        # Hold the stream open this long after its "data: [DONE]" event (before the EOF).
        self.linger_after_done_s = 0.0
        # Set: a stream pauses after its first chunk until the test sets this event.
        self.gate: asyncio.Event | None = None
        self.first_chunk_sent = asyncio.Event()
        self.calls = 0
        self.cancelled = 0
        self.bodies: list[dict[str, Any]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.completion)
        app.router.add_post("/v1/completions", self.completion)
        return app

    async def start(self, port: int = 0) -> FakeUpstream:
        self._runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": self.name, "object": "model", "max_model_len": self.max_model_len}]
        return web.json_response({"object": "list", "data": data})

    async def completion(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        body = await request.json()
        self.bodies.append(body)
        try:
            if self.drop_connection:
                assert request.transport is not None
                request.transport.close()
                return web.Response(status=500)
            if self.hang:
                await asyncio.sleep(3600)
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if self.fail_next > 0:
                self.fail_next -= 1
                return web.json_response({"error": {"message": "transient"}}, status=503)
            if self.fail_status:
                return web.json_response(
                    {"error": {"message": "injected failure", "type": "server_error"}},
                    status=self.fail_status,
                )
            chat = request.path.endswith("/chat/completions")
            text = f"{self.tag}: {_last_text(body)}"
            if body.get("stream"):
                return await self._stream(request, body, text, chat)
            return web.json_response(_answer(body, text, chat))
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def _stream(
        self, request: web.Request, body: dict[str, Any], text: str, chat: bool
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        words = text.split(" ")
        for i, word in enumerate(words):
            piece = word if i == 0 else " " + word
            if chat:
                choice = {"index": 0, "delta": {"content": piece}, "finish_reason": None}
                obj = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": piece, "finish_reason": None}
                obj = "text_completion"
            chunk = {
                "id": rid,
                "object": obj,
                "created": int(time.time()),
                "model": body["model"],
                "choices": [choice],
            }
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            if i == 0:
                self.first_chunk_sent.set()
                if self.gate is not None:
                    await self.gate.wait()
            if self.break_mid_stream and i == 1:
                assert request.transport is not None
                request.transport.close()
                return resp
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        await resp.write(b"data: [DONE]\n\n")
        if self.linger_after_done_s:
            await asyncio.sleep(self.linger_after_done_s)
        await resp.write_eof()
        return resp


def _last_text(body: dict[str, Any]) -> str:
    if "messages" in body:
        content = body["messages"][-1].get("content")
        return content if isinstance(content, str) else ""
    prompt = body.get("prompt")
    return prompt if isinstance(prompt, str) else ""


def _answer(body: dict[str, Any], text: str, chat: bool) -> dict[str, Any]:
    usage = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    if chat:
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
        "usage": usage,
    }


async def _serve(port: int) -> None:
    upstream = FakeUpstream(tag="bench")
    await upstream.start(port)
    print(f"fake upstream on {upstream.url}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(_serve(int(sys.argv[1])))
    except ImportError:
        asyncio.run(_serve(int(sys.argv[1])))
