"""Request validation (malformed, oversized, hostile), SSE/JSON response parsing for capture,
PII scrubbing and settings validation."""

from __future__ import annotations

import orjson
import pytest
from pydantic import ValidationError

from services.gateway.capture import parse_response, quality_score, scrubbed_request
from services.gateway.inputs import RequestError, trace_id_of, validate
from services.gateway.pii import scrub
from services.gateway.settings import GatewaySettings

MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("endpoint", "body", "fragment"),
    [
        ("chat", [], "JSON object"),
        ("chat", "str", "JSON object"),
        ("chat", {"messages": MSG}, "model"),
        ("chat", {"model": "", "messages": MSG}, "model"),
        ("chat", {"model": "m" * 201, "messages": MSG}, "model"),
        ("chat", {"model": "m"}, "messages"),
        ("chat", {"model": "m", "messages": "hi"}, "messages"),
        ("chat", {"model": "m", "messages": [1]}, "role"),
        ("chat", {"model": "m", "messages": [{"role": "user", "content": 5}]}, "content"),
        ("chat", {"model": "m", "messages": MSG, "stream": 1}, "stream"),
        ("chat", {"model": "m", "messages": MSG, "max_tokens": True}, "max_tokens"),
        ("chat", {"model": "m", "messages": MSG, "max_tokens": 0}, "max_tokens"),
        ("chat", {"model": "m", "messages": MSG, "user": 5}, "user"),
        ("completions", {"model": "m"}, "prompt"),
        ("completions", {"model": "m", "prompt": []}, "prompt"),
    ],
)
def test_malformed_requests_are_400(endpoint, body, fragment):
    with pytest.raises(RequestError) as err:
        validate(endpoint, body, max_depth=32)
    assert err.value.status == 400 and fragment in err.value.message


def test_deep_nesting_refused_without_recursion():
    deep: object = {}
    for _ in range(100_000):
        deep = {"a": deep}
    with pytest.raises(RequestError, match="nested deeper"):
        validate("chat", {"model": "m", "messages": MSG, "x": deep}, max_depth=32)


def test_valid_requests_pass():
    body = {"model": "m", "messages": MSG, "stream": True, "max_tokens": 5, "user": "u"}
    assert validate("chat", body, max_depth=32) is body
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}]}]
    validate("chat", {"model": "m", "messages": parts}, max_depth=32)
    validate("completions", {"model": "m", "prompt": ["a", "b"]}, max_depth=32)


def test_trace_id_from_traceparent_or_fresh():
    tid = "4bf92f3577b34da6a3ce929d0e0e4736"
    assert trace_id_of([(b"traceparent", f"00-{tid}-00f067aa0ba902b7-01".encode())]) == tid
    for hostile in (b"00-zz-00-01", b"00-" + b"g" * 32 + b"-00f067aa0ba902b7-01", b"", b"\xff"):
        fresh = trace_id_of([(b"traceparent", hostile)])
        assert len(fresh) == 32 and fresh != tid
        int(fresh, 16)


def test_parse_json_and_sse_responses():
    body = orjson.dumps(
        {
            "id": "chatcmpl-1",
            "choices": [{"message": {"content": "hey"}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1},
        }
    )
    p = parse_response(body, False)
    assert (p.response_id, p.text, p.prompt_tokens, p.completion_tokens) == (
        "chatcmpl-1",
        "hey",
        3,
        1,
    )
    chunks = [
        b'data: {"id":"c2","choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n',
        b'data: {"id":"c2","choices":[{"index":0,"delta":{"content":"a"}}]}\n\n',
        b'data: {"id":"c2","ch',
        b'oices":[{"index":0,"delta":{"content":"b"}}]}\n\n: comment\n\ndata: not json\n\n',
        b'data: {"id":"c2","choices":[{"index":1,"delta":{"content":"other"}}]}\n\n',
        b"data: [DONE]\n\n",
    ]
    p = parse_response(chunks, True)
    assert (p.response_id, p.text, p.completion_tokens) == ("c2", "ab", 2)
    for hostile in (b"", b"null", b"[1]", b"{", b'{"choices": [1]}'):
        assert parse_response(hostile, False).text == ""
    assert parse_response([b"data: [1]\n\n", b"\xff\xfe"], True).text == ""


def test_scrubbed_request_and_quality_score():
    chat = scrubbed_request(
        "chat",
        {
            "messages": [
                {"role": "user", "content": "mail a@b.co"},
                {"role": "user", "content": [{"type": "text", "text": "ssn 123-45-6789"}]},
                "junk",
            ]
        },
    )
    assert "a@b.co" not in chat and "<EMAIL>" in chat and "<SSN>" in chat
    assert "<IP>" in scrubbed_request("completions", {"prompt": ["host 10.1.2.3", 7]})
    assert quality_score(1, None) == 1.0
    assert quality_score(-1, None) == 0.0
    assert quality_score(1, "better") == 0.0
    assert quality_score(0, None) == 0.5


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("write to john.doe@example.com", "write to <EMAIL>"),
        ("card 4111-1111-1111-1111", "card <CARD>"),
        ("call +44 20 7946 0958", "call <PHONE>"),
        ("token sk-abcdefghijklmnop1234", "token <SECRET>"),
        ("Authorization: Bearer abcdefghijklmnopqrstu", "Authorization: Bearer <SECRET>"),
        ("remind me at 10:30 on 2024-05-06", "remind me at 10:30 on 2024-05-06"),
        ("", ""),
    ],
)
def test_pii_scrub(text, expected):
    assert scrub(text) == expected


def test_card_needs_luhn():
    assert "<CARD>" not in scrub("order 1234 5678 9012 3456")


def test_settings_validation(monkeypatch):
    monkeypatch.setenv("GATEWAY_CANARY_STEPS", "0.05,0.5")
    assert GatewaySettings().canary_steps == [0.05, 0.5, 1.0]
    monkeypatch.setenv("ENABLE_DATA_COLLECTION", "false")
    assert GatewaySettings().enable_data_collection is False
    for bad in ("0.5,0.2", "0,0.5", "1.5", ""):
        monkeypatch.setenv("GATEWAY_CANARY_STEPS", bad)
        with pytest.raises(ValidationError):
            GatewaySettings()


async def test_capture_stop_finishes_the_batch_being_written_once():
    """stop() used to cancel the writer mid-write and write the batch again (charging its
    tokens twice, or losing it when the cut transaction held the database); now the batch in
    flight completes, what is queued follows, and a record offered later is counted."""
    import asyncio
    import contextlib

    from services.gateway.capture import CaptureRecord, CaptureSink

    release = asyncio.Event()
    writing = asyncio.Event()
    inserted: list[list[dict[str, object]]] = []

    class Session:
        async def exec(self, statement: object, params: list[dict[str, object]]) -> None:
            writing.set()
            await release.wait()
            inserted.append(params)

    class Db:
        @contextlib.asynccontextmanager
        async def session(self):  # type: ignore[no-untyped-def]
            yield Session()

    charged: list[int] = []
    sink = CaptureSink(
        Db(),  # type: ignore[arg-type]
        enabled=True,
        queue_size=10,
        batch_size=2,
        flush_s=0.01,
        max_text_chars=1000,
        charge_tokens=lambda key, tpm, used: charged.append(used),
    )

    def record(i: int) -> CaptureRecord:
        body = orjson.dumps(
            {
                "id": f"r{i}",
                "choices": [{"message": {"content": "a"}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 2},
            }
        )
        return CaptureRecord(
            endpoint="chat",
            request={"messages": [{"role": "user", "content": "q"}]},
            body=body,
            stream=False,
            served_model_name="m",
            deployment_id="d",
            model_id=None,
            key_id="k",
            key_tpm=None,
            user_hash=None,
            status_code=200,
            latency_ms=1.0,
            trace_id=None,
        )

    sink.start()
    sink.offer(record(0))
    sink.offer(record(1))
    await writing.wait()  # the first batch is inside its transaction
    sink.offer(record(2))
    stopping = asyncio.create_task(sink.stop())
    await asyncio.sleep(0)
    release.set()
    await stopping
    assert [[row["id"] for row in batch] for batch in inserted] == [["r0", "r1"], ["r2"]]
    assert charged == [3, 3, 3] and sink.written == 3 and sink.dropped == 0
    sink.offer(record(3))  # after stop: counted, never silently lost
    assert sink.dropped == 1
