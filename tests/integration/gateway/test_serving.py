"""The gateway in front of a scripted upstream, through the official ``openai`` client:
serving (sync, streaming, completions, models), headers, and every refusal path with zero
upstream calls where the issue requires it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import openai
import pytest

from services.gateway.app import GatewayService
from tests.integration.gateway.conftest import (
    ADMIN_KEY,
    MODEL,
    admin_get,
    admin_post,
    base_url,
    new_key,
)
from tests.integration.streams import eventually

pytestmark = pytest.mark.integration


async def _wait_routed(gw: GatewayService) -> None:
    await eventually(lambda: MODEL in gw.state.routes, what="route for the baseline")


async def test_openai_client_sync_stream_and_refusals(
    gateways, upstreams, pipeline, tmp_path: Path, span_file: Path
):
    up = await upstreams("base")
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}"
    async with gateways(db_url, trace_sample_ratio=1.0) as gw:
        await pipeline.deployed("base-1", up, "baseline")
        await _wait_routed(gw)
        key = await new_key(gw, name="alice")
        url = base_url(gw) + "/v1"

        def sync_calls() -> tuple[object, list[str], object, object]:
            client = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": "hello there"}]
            )
            chunks = [
                c.choices[0].delta.content or ""
                for c in client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": "stream me please"}],
                    stream=True,
                )
                if c.choices
            ]
            completion = client.completions.create(model=MODEL, prompt="complete this")
            models = client.models.list()
            return raw, chunks, completion, models

        raw, chunks, completion, models = await asyncio.to_thread(sync_calls)
        answer = raw.parse()  # type: ignore[attr-defined]
        assert answer.choices[0].message.content == "base: hello there"
        assert raw.headers["x-tuneloop-deployment"] == "base-1"  # type: ignore[attr-defined]
        assert len(raw.headers["x-tuneloop-trace-id"]) == 32  # type: ignore[attr-defined]
        assert "".join(chunks) == "base: stream me please" and len(chunks) >= 3
        assert completion.choices[0].text == "base: complete this"  # type: ignore[attr-defined]
        assert [m.id for m in models] == [MODEL]  # type: ignore[attr-defined]

        # Async client, streaming, trace id taken from an incoming traceparent.
        trace = "4bf92f3577b34da6a3ce929d0e0e4736"
        aclient = openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0)
        async with aclient.chat.completions.with_streaming_response.create(
            model=MODEL,
            messages=[{"role": "user", "content": "a b c"}],
            stream=True,
            extra_headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"},
        ) as resp:
            assert resp.headers["x-tuneloop-trace-id"] == trace
            assert resp.headers["x-tuneloop-deployment"] == "base-1"
            body = await resp.text()
        assert "data: [DONE]" in body
        spans = [json.loads(line) for line in span_file.read_text().splitlines()]
        mine = [sp for sp in spans if sp["trace_id"] == trace and sp["service"] == "tests"]
        assert any(
            sp["name"] == "POST /v1/chat/completions"
            and sp["parent_span_id"] == "00f067aa0ba902b7"
            and sp["attributes"]["tuneloop.deployment_id"] == "base-1"
            and sp["attributes"]["http.response.status_code"] == 200
            for sp in mine
        ), mine
        assert up.calls == 4

        # ---- refusals: none of these reaches the upstream
        calls = up.calls
        admin_only = await new_key(gw, scopes=["admin"])
        other_model_only = await new_key(gw, models=["something-else"])
        limited = await new_key(gw, rpm=2)
        msg = [{"role": "user", "content": "x"}]
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:

            async def post(path: str, token: str | None, **kw: object) -> httpx.Response:
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                return await http.post(path, headers=headers, **kw)  # type: ignore[arg-type]

            ok = {"model": MODEL, "messages": msg}
            assert (await post("/chat/completions", None, json=ok)).status_code == 401
            assert (await post("/chat/completions", "tl_bad_key", json=ok)).status_code == 401
            assert (await post("/chat/completions", key + "x", json=ok)).status_code == 401
            r = await http.post("/chat/completions", json=ok, headers={"Authorization": key})
            assert r.status_code == 401
            assert r.headers["x-tuneloop-deployment"] == "none"
            assert len(r.headers["x-tuneloop-trace-id"]) == 32
            assert (await post("/chat/completions", admin_only, json=ok)).status_code == 403
            r = await post("/chat/completions", other_model_only, json=ok)
            assert r.status_code == 403 and "may not use model" in r.text
            r = await post("/chat/completions", key, json={"model": "nope", "messages": msg})
            assert r.status_code == 404
            big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 1_200_000}]}
            r = await post("/chat/completions", key, json=big)
            assert r.status_code == 413
            r = await post("/chat/completions", key, content=b'{"model": "tuneloop", "mess')
            assert r.status_code == 400 and "not valid JSON" in r.text
            deep: object = "x"
            for _ in range(200):
                deep = [deep]
            r = await post("/chat/completions", key, json={"model": MODEL, "messages": deep})
            assert r.status_code == 400 and "nested deeper" in r.text
            for bad in (
                [],
                {"model": MODEL},
                {"model": MODEL, "messages": []},
                {"model": MODEL, "messages": [{"content": "no role"}]},
                {"model": MODEL, "messages": msg, "stream": "yes"},
                {"model": MODEL, "messages": msg, "max_tokens": -1},
                {"model": 7, "messages": msg},
                {"model": MODEL, "messages": msg, "user": "u" * 1000},
            ):
                r = await post("/chat/completions", key, json=bad)
                assert r.status_code == 400, (bad, r.text)
            r = await post("/completions", key, json={"model": MODEL, "prompt": 12})
            assert r.status_code == 400
            # Beyond the model's context (512 tokens, learned from the upstream's /v1/models).
            long = {"model": MODEL, "messages": [{"role": "user", "content": "word " * 2000}]}
            r = await post("/chat/completions", key, json=long)
            assert r.status_code == 400 and "maximum context length is 512" in r.text
            r = await post("/chat/completions", key, json={**ok, "max_tokens": 100_000})
            assert r.status_code == 400 and "context" in r.text
            assert (
                await http.get("/chat/completions", headers={"Authorization": f"Bearer {key}"})
            ).status_code == 405
            # Rate limit: 2 requests a minute, the third is refused with Retry-After.
            statuses = [(await post("/chat/completions", limited, json=ok)) for _ in range(3)]
            assert [s.status_code for s in statuses] == [200, 200, 429]
            assert int(statuses[2].headers["retry-after"]) >= 1
            # Revocation takes effect at once.
            key_id = key.split("_")[1]
            async with httpx.AsyncClient(base_url=base_url(gw)) as admin:
                r = await admin.delete(
                    f"/admin/keys/{key_id}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
                )
                assert r.status_code == 200
            assert (await post("/chat/completions", key, json=ok)).status_code == 401
        assert up.calls == calls + 2  # only the two requests the rate limit let through

        # Admin API refuses client keys and hostile bodies.
        async with httpx.AsyncClient(base_url=base_url(gw)) as http:
            r = await http.get("/admin/routes", headers={"Authorization": f"Bearer {limited}"})
            assert r.status_code == 403
            r = await http.get("/admin/routes")
            assert r.status_code == 401
        r = await admin_post(gw, f"/admin/routes/{MODEL}/weight", {"deployment_id": "base-1"})
        assert r.status_code == 422
        r = await admin_post(
            gw, f"/admin/routes/{MODEL}/weight", {"deployment_id": "../etc", "weight": 0.5}
        )
        assert r.status_code == 422
        r = await admin_post(
            gw, f"/admin/routes/{MODEL}/weight", {"deployment_id": "ghost", "weight": 0.5}
        )
        assert r.status_code == 404
        r = await admin_post(gw, "/admin/keys", {"scopes": ["root"]})
        assert r.status_code == 400
        r = await admin_post(gw, "/admin/keys", {"name": "x" * 1_100_000})
        assert r.status_code == 413
        r = await admin_get(gw, "/admin/routes")
        assert r.status_code == 200 and len(r.headers["x-tuneloop-trace-id"]) == 32
        assert r.json()["models"][MODEL][0]["state"] == "stable"
