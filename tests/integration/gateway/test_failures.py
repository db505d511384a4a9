"""Failure handling: failover only before the first byte, deadlines, all backends down,
a stream that breaks after its first byte, and client disconnects cancelling upstream work."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.gateway.conftest import MODEL, base_url, new_key
from tests.integration.streams import eventually

pytestmark = pytest.mark.integration

MSG = [{"role": "user", "content": "one two three four"}]


async def test_failover_deadline_outage_midstream_and_disconnect(
    gateways, upstreams, pipeline, tmp_path: Path
):
    stable, canary = await upstreams("stable"), await upstreams("canary")
    async with gateways(
        f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}",
        upstream_timeout_s=1.0,
        stream_idle_timeout_s=1.0,
        breaker_failures=50,
    ) as gw:
        await pipeline.deployed("stable-1", stable, "baseline")
        await eventually(lambda: MODEL in gw.state.routes, what="route")
        key = await new_key(gw)
        headers = {"Authorization": f"Bearer {key}"}
        ok = {"model": MODEL, "messages": MSG}
        async with httpx.AsyncClient(base_url=base_url(gw), timeout=10) as http:
            # A transient failure before the first byte: retried once on stable.
            stable.fail_next = 1
            r = await http.post("/v1/chat/completions", headers=headers, json=ok)
            assert r.status_code == 200 and stable.calls == 2
            # Streams too: nothing reached the client yet, so the retry is invisible.
            stable.fail_next = 1
            r = await http.post(
                "/v1/chat/completions", headers=headers, json={**ok, "stream": True}
            )
            assert r.status_code == 200 and "data: [DONE]" in r.text and stable.calls == 4

            # Two failures in a row: 503 with Retry-After, after exactly one retry.
            stable.fail_next = 2
            r = await http.post("/v1/chat/completions", headers=headers, json=ok)
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
            assert stable.calls == 6
            assert r.headers["x-tuneloop-trace-id"]

            # Past the deadline: 504, no retry (the deadline is the client's budget).
            stable.delay_s = 1.5
            r = await http.post("/v1/chat/completions", headers=headers, json=ok)
            assert r.status_code == 504 and stable.calls == 7
            stable.delay_s = 0.0

            # Breaks after its first byte: the stream ends with an error event, no retry.
            stable.break_mid_stream = True
            client = openai.AsyncOpenAI(base_url=base_url(gw) + "/v1", api_key=key, max_retries=0)
            got: list[str] = []

            async def consume() -> None:
                stream = await client.chat.completions.create(
                    model=MODEL,
                    messages=MSG,
                    stream=True,  # type: ignore[arg-type]
                )
                async for chunk in stream:
                    got.append(chunk.choices[0].delta.content or "")

            with pytest.raises(openai.APIError, match="mid-stream"):
                await consume()
            assert got and stable.calls == 8
            stable.break_mid_stream = False

            # A canary that drops connections: its users are served by stable.
            dep = await pipeline.deployed("canary-1", canary, "candidate")
            await eventually(lambda: "canary-1" in gw.state.rows, what="canary registered")
            await pipeline.evaluated(dep, passed=True)
            await eventually(lambda: gw.state.routes[MODEL].canary is not None, what="canary")
            gw.state.settings.step_min_requests = 10_000
            canary.drop_connection = True
            answered = set()
            for i in range(80):
                r = await http.post(
                    "/v1/chat/completions", headers=headers, json={**ok, "user": f"u{i}"}
                )
                assert r.status_code == 200
                answered.add(r.headers["x-tuneloop-deployment"])
            assert canary.calls > 0 and answered == {"stable-1"}
            await eventually(lambda: gw.state.routes[MODEL].canary is None, what="rolled back")

            # A canary that answers, but far slower than stable: rolled back on latency.
            slow = await upstreams("slow")
            slow.delay_s = 1.5
            gw.state.settings.upstream_timeout_s = 10.0  # slow, not past the deadline
            dep = await pipeline.deployed("slow-1", slow, "candidate")
            await eventually(lambda: "slow-1" in gw.state.rows, what="slow registered")
            await pipeline.evaluated(dep, passed=True)
            await eventually(lambda: gw.state.routes[MODEL].canary is not None, what="canary")
            for _ in range(4):
                for _ in range(3):  # stable's reference window
                    await http.post("/v1/chat/completions", headers=headers, json=ok)
                results = await asyncio.gather(
                    *(
                        http.post(
                            "/v1/chat/completions", headers=headers, json={**ok, "user": f"s{i}"}
                        )
                        for i in range(30)
                    )
                )
                assert all(r.status_code == 200 for r in results)
                if gw.state.rows["slow-1"].state == "rolled_back":
                    break
            assert gw.state.rows["slow-1"].state == "rolled_back"
            assert "p95 latency" in gw.state.rows["slow-1"].reason

            # The client goes away: the upstream request is cancelled (non-stream and stream).
            stable.hang = True
            for body in (ok, {**ok, "stream": True}):
                before = stable.cancelled
                with pytest.raises(httpx.ReadTimeout):
                    await http.post("/v1/chat/completions", headers=headers, json=body, timeout=0.3)
                await eventually(lambda b=before: stable.cancelled == b + 1, what="cancelled")
            stable.hang = False

            # Every upstream down: 503 with Retry-After.
            await stable.stop()
            await canary.stop()
            r = await http.post("/v1/chat/completions", headers=headers, json=ok)
            assert r.status_code == 503 and "retry-after" in r.headers
            await asyncio.sleep(0)
