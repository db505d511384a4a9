"""Interaction capture: rows written off the hot path with PII scrubbed, feedback feeding the
quality score, the ENABLE_DATA_COLLECTION switch, and requests unharmed when capture cannot
keep up or its database is gone."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from sqlalchemy.exc import OperationalError
from sqlmodel import select

from shared.db import Database
from shared.interactions import Interaction
from tests.integration.gateway.conftest import MODEL, base_url, new_key
from tests.integration.streams import eventually

pytestmark = pytest.mark.integration

PII = "I am jane.roe@example.com, card 4111 1111 1111 1111, call +1 415 555 0132"


async def _rows(db_url: str) -> list[Interaction]:
    db = Database(db_url)
    try:
        async with db.session() as session:
            return list((await session.exec(select(Interaction))).all())
    finally:
        await db.dispose()


async def _serving_base(gw, pipeline, up) -> dict[str, str]:
    """Deploy ``up`` as the baseline ``base-1``, wait for its route; a client key's header."""
    await pipeline.deployed("base-1", up, "baseline")
    await eventually(lambda: MODEL in gw.state.routes, what="route")
    return {"Authorization": f"Bearer {await new_key(gw)}"}


async def test_capture_scrubs_pii_and_takes_feedback(gateways, upstreams, pipeline, database_url):
    up = await upstreams("base")
    async with gateways(database_url) as gw:
        await pipeline.deployed("base-1", up, "baseline")
        await eventually(lambda: MODEL in gw.state.routes, what="route")
        key, other = await new_key(gw), await new_key(gw)
        auth = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=base_url(gw) + "/v1", timeout=10) as http:
            r = await http.post(
                "/chat/completions",
                headers=auth,
                json={"model": MODEL, "messages": [{"role": "user", "content": PII}]},
            )
            assert r.status_code == 200
            response_id = r.json()["id"]
            # Feedback right away (possibly before the row is written): applied when it is.
            fb = {"response_id": response_id, "rating": -1, "correction": "a better answer"}
            r = await http.post("/feedback", headers=auth, json=fb)
            assert r.status_code == 202
            r = await http.post(
                "/chat/completions",
                headers=auth,
                json={
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "x y"}],
                    "stream": True,
                },
            )
            assert r.status_code == 200
            r = await http.post("/completions", headers=auth, json={"model": MODEL, "prompt": PII})
            assert r.status_code == 200
            # Hostile and malformed feedback.
            for bad in (
                {"response_id": response_id, "rating": 5},
                {"response_id": "", "rating": 1},
                {"response_id": "x" * 65, "rating": 1},
                {"response_id": response_id, "rating": 1, "extra": True},
                {"response_id": response_id, "rating": 1, "correction": "c" * 100_001},
            ):
                assert (await http.post("/feedback", headers=auth, json=bad)).status_code == 422
            r = await http.post("/feedback", json={"response_id": response_id, "rating": 1})
            assert r.status_code == 401
            # Another key cannot rate this answer.
            r = await http.post(
                "/feedback",
                headers={"Authorization": f"Bearer {other}"},
                json={"response_id": response_id, "rating": 1},
            )
            assert r.status_code == 202 and r.json()["applied"] is False

        rows = await eventually(lambda: _count(database_url, 3), what="3 interactions")
        # The feedback came before its row was written: applied shortly after it is.
        rated = await eventually(lambda: _rated(database_url, response_id), what="feedback applied")
        assert rated.feedback_rating == -1 and rated.quality_score == 0.0
        assert rated.feedback_comment == "a better answer"
        rows = {r.endpoint + (":s" if r.response_text == "base: x y" else ""): r for r in rows}
        chat, stream, completion = rows["chat"], rows["chat:s"], rows["completions"]
        for row in (chat, completion):
            stored = row.request + row.response_text
            assert "jane.roe" not in stored and "4111" not in stored and "555" not in stored
            assert "<EMAIL>" in stored and "<CARD>" in stored and "<PHONE>" in stored
        assert json.loads(chat.request)["messages"][0]["role"] == "user"
        assert chat.id == response_id and chat.deployment_id == "base-1"
        assert chat.model_id == "model-base-1" and chat.status_code == 200
        assert chat.prompt_tokens == 7 and chat.completion_tokens == 5
        assert chat.latency_ms > 0 and chat.trace_id and len(chat.trace_id) == 32
        assert chat.api_key_id == key.split("_")[1]
        assert stream.response_text == "base: x y" and stream.completion_tokens == 3
        assert json.loads(completion.request)["prompt"].startswith("I am <EMAIL>")


async def _rated(db_url: str, response_id: str) -> Interaction | None:
    rows = [r for r in await _rows(db_url) if r.id == response_id and r.feedback_rating]
    return rows[0] if rows else None


async def _count(db_url: str, n: int) -> list[Interaction] | None:
    rows = await _rows(db_url)
    return rows if len(rows) >= n else None


async def test_capture_switch_overload_and_db_down(gateways, upstreams, pipeline, tmp_path):
    up = await upstreams("base")
    url = f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}"
    async with gateways(url, enable_data_collection=False) as gw:
        await pipeline.deployed("base-1", up, "baseline")
        await eventually(lambda: MODEL in gw.state.routes, what="route")
        key = await new_key(gw)
        auth = {"Authorization": f"Bearer {key}"}
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        async with httpx.AsyncClient(base_url=base_url(gw) + "/v1", timeout=10) as http:
            assert (
                await http.post("/chat/completions", headers=auth, json=body)
            ).status_code == 200
            await gw.state.capture.flush()
            assert await _rows(url) == []  # switched off: nothing stored

            # Capture on, a queue of one and a database that is gone: requests do not care.
            gw.state.capture.enabled = True
            gw.state.capture.queue = asyncio.Queue(maxsize=1)
            broken = Database("sqlite+aiosqlite:////nonexistent/dir/x.db")
            gw.state.capture.db = broken
            gw.state.db = broken  # route and key syncs fail too: the last good table serves
            results = await asyncio.gather(
                *(http.post("/chat/completions", headers=auth, json=body) for _ in range(30))
            )
            assert all(r.status_code == 200 for r in results)
            await eventually(lambda: gw.state.capture.dropped > 0, what="capture dropped")
            with pytest.raises(OperationalError):
                await gw.state.sync_once(force=True)
            r = await http.post("/chat/completions", headers=auth, json=body)
            assert r.status_code == 200


async def test_capture_sink_keeps_inflight_records_at_shutdown_and_drops_when_full(sqlite_db):
    from services.gateway.capture import CaptureRecord, CaptureSink

    sink = CaptureSink(
        sqlite_db,
        enabled=True,
        queue_size=5,
        batch_size=100,
        flush_s=30.0,
        max_text_chars=1000,
    )

    def record(i: int) -> CaptureRecord:
        body = json.dumps({"id": f"r{i}", "choices": [{"message": {"content": f"a{i}"}}]})
        return CaptureRecord(
            endpoint="chat",
            request={"messages": [{"role": "user", "content": "q"}]},
            body=body.encode(),
            stream=False,
            served_model_name=MODEL,
            deployment_id="d",
            model_id=None,
            key_id="k",
            key_tpm=None,
            user_hash=None,
            status_code=200,
            latency_ms=1.0,
            trace_id=None,
        )

    for i in range(7):
        sink.offer(record(i))
    assert sink.dropped == 2  # a full queue drops, never waits
    sink.start()
    await asyncio.sleep(0.05)  # the writer has taken a record and waits for its batch
    await sink.stop()
    async with sqlite_db.session() as session:
        ids = sorted(r.id for r in (await session.exec(select(Interaction))).all())
    assert ids == [f"r{i}" for i in range(5)]


async def test_a_stream_that_ends_during_shutdown_is_captured(
    gateways, upstreams, pipeline, database_url
):
    """The race: a streamed answer that completes after shutdown began used to be queued
    after capture was drained, and lost. Here the upstream holds the stream open (a gate)
    until shutdown has begun, so the order is forced, not timed."""
    up = await upstreams("base")
    up.gate = asyncio.Event()
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "a slow answer"}],
        "stream": True,
    }
    async with gateways(database_url, shutdown_grace_s=120.0) as gw:
        auth = await _serving_base(gw, pipeline, up)
        async with (
            httpx.AsyncClient(base_url=base_url(gw) + "/v1", timeout=60) as http,
            http.stream("POST", "/chat/completions", headers=auth, json=body) as resp,
        ):
            chunks = resp.aiter_raw()
            received = [await anext(chunks)]  # the stream is under way
            stopping = asyncio.create_task(gw.stop())
            await eventually(lambda: gw.asgi.closing, what="shutdown began")
            # A new request is refused at once, without reaching an upstream.
            calls = up.calls
            async with httpx.AsyncClient(base_url=base_url(gw) + "/v1", timeout=10) as other:
                late = await other.post(
                    "/chat/completions", headers=auth, json={**body, "stream": False}
                )
            assert late.status_code == 503 and late.headers["retry-after"]
            assert "shutting down" in late.json()["error"]["message"]
            assert up.calls == calls
            assert not stopping.done()  # it waits for the stream in flight
            up.gate.set()  # the stream ends now, after shutdown began
            received += [c async for c in chunks]
        await stopping
        assert gw.state.capture.dropped == 0
    text = b"".join(received)
    assert text.count(b"data: ") >= 4 and text.rstrip().endswith(b"[DONE]")
    rows = await _rows(database_url)
    assert [r.response_text for r in rows] == ["base: a slow answer"]
    assert rows[0].status_code == 200


async def test_a_client_that_hangs_up_after_done_still_gets_its_answer_recorded(
    gateways, upstreams, pipeline, database_url
):
    """The race (seen in CI through the real openai client): a client reads a stream to its
    "data: [DONE]" event and closes the connection while the gateway still waits for the
    upstream's end of stream. That disconnect used to cancel the request: the finished answer
    was neither captured nor counted as a success, and the upstream call was cancelled.
    Here the upstream holds its end of stream back, so the order is forced, not timed."""
    up = await upstreams("base")
    up.linger_after_done_s = 1.0
    body = {"model": MODEL, "messages": [{"role": "user", "content": "all of it"}], "stream": True}
    async with gateways(database_url) as gw:
        auth = await _serving_base(gw, pipeline, up)
        async with (
            httpx.AsyncClient(base_url=base_url(gw) + "/v1", timeout=30) as http,
            http.stream("POST", "/chat/completions", headers=auth, json=body) as resp,
        ):
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.strip() == "data: [DONE]":
                    break  # leaving the block closes the connection mid-body
        rows = await eventually(lambda: _count(database_url, 1), timeout_s=15, what="captured")
        assert rows[0].response_text == "base: all of it" and rows[0].status_code == 200
        assert up.cancelled == 0
        assert gw.state.stats.get("base-1", -1).requests == 1  # a success, not a 499


async def test_a_stream_past_the_shutdown_grace_is_cut_and_shutdown_completes(
    gateways, upstreams, pipeline, tmp_path
):
    up = await upstreams("base")
    up.gate = asyncio.Event()  # never set: the upstream would stream forever
    url = f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True}
    async with gateways(url, shutdown_grace_s=0.5) as gw:
        auth = await _serving_base(gw, pipeline, up)
        async with (
            httpx.AsyncClient(base_url=base_url(gw) + "/v1", timeout=60) as http,
            http.stream("POST", "/chat/completions", headers=auth, json=body) as resp,
        ):
            chunks = resp.aiter_raw()
            await anext(chunks)
            await gw.stop()  # returns: the stream was cancelled after the grace period
            with pytest.raises(httpx.HTTPError):
                async for _ in chunks:
                    pass
        await eventually(lambda: up.cancelled == 1, what="upstream request cancelled")
    assert await _rows(url) == []  # it never completed: nothing to capture
