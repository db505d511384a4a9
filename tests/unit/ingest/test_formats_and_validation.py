"""Parsing, normalisation and validation of single records and files."""

from __future__ import annotations

import gzip
import random
import struct
import zlib
from pathlib import Path

import orjson
import pytest

from services.ingest.pipeline import formats, validate
from services.ingest.pipeline.chunks import ChunkJob, Rules, process_chunk
from services.ingest.pipeline.formats import RecordError, detect_format, iter_items, normalise
from tests.unit.ingest.corpus import alpaca, openai, sharegpt

P, A = "p" * 60, "a" * 120


@pytest.mark.parametrize(
    ("record", "fmt"),
    [(alpaca(P, A), "alpaca"), (openai(P, A), "openai"), (sharegpt(P, A), "sharegpt")],
)
def test_each_format_normalises_to_chat(record, fmt):
    assert detect_format(record) == fmt
    messages = normalise(record, fmt)
    assert [m["role"] for m in messages][-2:] == ["user", "assistant"]
    assert messages[-1]["content"] == A
    assert messages[-2]["content"] == P


def test_alpaca_input_is_appended_to_the_instruction():
    messages = normalise({"instruction": "Summarise", "input": "the text", "output": A}, "alpaca")
    assert messages[0] == {"role": "user", "content": "Summarise\n\nthe text"}


def test_openai_content_parts_are_joined():
    rec = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {"role": "assistant", "content": "c"},
        ]
    }
    assert normalise(rec, "openai")[0]["content"] == "ab"


@pytest.mark.parametrize(
    ("record", "fmt", "reason"),
    [
        ([1, 2], "alpaca", "not an object"),
        ({"messages": "hi"}, "openai", "must be a list"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "openai", "unsupported role"),
        ({"messages": [{"role": "user", "content": {"$gt": 1}}]}, "openai", "not a string"),
        ({"conversations": [{"from": "martian", "value": "x"}]}, "sharegpt", "unsupported"),
        ({"instruction": "x"}, "alpaca", "needs instruction and output"),
        ({"instruction": None, "output": "y"}, "alpaca", "not a string"),
    ],
)
def test_hostile_or_malformed_records_are_refused_with_a_reason(record, fmt, reason):
    with pytest.raises(RecordError, match=reason):
        normalise(record, fmt)


def test_role_order_and_empty_turns():
    ok = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
    ]
    assert validate.role_order_error(ok) is None
    assert "expected user" in validate.role_order_error(ok[:1] + ok[2:])  # type: ignore[operator]
    assert "last turn" in validate.role_order_error(ok[:2])  # type: ignore[operator]
    assert validate.role_order_error([]) == "no messages"
    assert validate.empty_turn_error([{"role": "user", "content": "  \n"}]) is not None


@pytest.mark.parametrize(
    "answer",
    [
        'Traceback (most recent call last):\n  File "x.py", line 1',
        "I'm sorry, I cannot help with that request.",
        "I'm sorry, but I can't do that.",
        "As an AI language model, I have no opinion.",
        "openai.error.RateLimitError: Rate limit reached for requests",
        "Error code: 429 - insufficient_quota",
        '{"error": {"message": "context_length_exceeded"}}',
        "502 Bad Gateway",
    ],
)
def test_error_text_in_answers_is_detected(answer):
    assert validate.error_text(answer) is not None


def test_ordinary_answers_are_not_error_text():
    for answer in (
        "The error margin is 2%.",
        "Sorry for the delay: here is the summary.",
        "Raise ValueError when the input is negative.",
    ):
        assert validate.error_text(answer) is None


def _run(items, fmt=None, **rules):
    return process_chunk(
        ChunkJob(
            items=items,
            format=fmt,
            domain=None,
            source="t",
            trusted=False,
            rules=Rules(near_dedupe=False, **rules),
        )
    )


def test_length_bounds_are_configurable_and_reported():
    short = orjson.dumps(alpaca("p" * 10, A))
    long_answer = orjson.dumps(alpaca(P, "a" * 40_000))
    good = orjson.dumps(alpaca(P, A))
    result = _run([(1, short), (2, long_answer), (3, good)], "alpaca")
    assert [(pos, code) for pos, code, _ in result.rejected] == [
        (1, "input_too_short"),
        (2, "output_too_long"),
    ]
    assert result.positions == [3]
    relaxed = _run([(1, short)], "alpaca", min_input_chars=5)
    assert len(relaxed.positions) == 1


def test_broken_lines_are_reported_with_line_numbers_and_the_rest_kept(tmp_path: Path):
    lines = [orjson.dumps(alpaca(P + str(i), A)) for i in range(5)]
    lines.insert(2, b'{"instruction": "cut')
    lines.insert(4, b"\xff\xfe not json")
    lines.insert(5, b"")
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    result = _run(list(iter_items(path)), "alpaca")
    assert [(pos, code) for pos, code, _ in result.rejected] == [(3, "parse"), (5, "parse")]
    assert len(result.positions) == 5


def test_json_arrays_and_gzip_are_streamed(tmp_path: Path):
    rows = [sharegpt(P + str(i), A) for i in range(3)]
    arr = tmp_path / "a.json"
    arr.write_bytes(b"  \n" + orjson.dumps(rows))
    gz = tmp_path / "b.jsonl.gz"
    gz.write_bytes(gzip.compress(b"\n".join(orjson.dumps(r) for r in rows)))
    parsed = list(iter_items(arr))
    assert [pos for pos, _ in parsed] == [1, 2, 3]
    assert orjson.loads(parsed[0][1])["conversations"][0]["value"] == P + "0"
    assert len(list(iter_items(gz))) == 3


def test_a_truncated_json_array_reports_where_it_broke(tmp_path: Path):
    arr = tmp_path / "a.json"
    arr.write_bytes(orjson.dumps([alpaca(P, A)] * 3)[:-40])
    items = iter_items(arr)
    assert next(items)[0] == 1
    with pytest.raises(RecordError, match="after element"):
        list(items)


def test_oversized_and_deeply_nested_lines_are_rejected(monkeypatch):
    monkeypatch.setattr(formats, "MAX_RECORD_BYTES", 1000)
    huge = orjson.dumps(alpaca(P, "a" * 2000))
    nested = b"[" * 100_000 + b"]" * 100_000
    surrogate = b'{"instruction": "\\ud800 lone surrogate", "output": "x"}'
    result = _run([(1, huge), (2, nested), (3, b"null"), (4, b'"just a string"'), (5, surrogate)])
    codes = {pos: code for pos, code, _ in result.rejected}
    assert codes == {1: "parse", 2: "parse", 3: "format", 4: "format", 5: "parse"}
    assert "longer than" in result.rejected[0][2]


def test_answers_with_error_text_are_rejected_in_a_chunk():
    items = [
        (1, orjson.dumps(alpaca(P, A))),
        (2, orjson.dumps(alpaca(P, "I'm sorry, I cannot help with that. " + A))),
        (3, orjson.dumps(openai(P, A + " Traceback (most recent call last): boom"))),
        (4, orjson.dumps(alpaca(P + "x", A + "y"))),
    ]
    result = _run(items, None)
    assert [(pos, code) for pos, code, _ in result.rejected] == [
        (2, "error_text"),
        (3, "error_text"),
    ]
    assert result.positions == [1, 4]
    assert len(_run(items, None, reject_error_text=False).positions) == 4


def test_a_byte_order_mark_is_skipped(tmp_path: Path):
    rows = [alpaca(P, A)]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + orjson.dumps(rows[0]) + b"\r\n")
    arr = tmp_path / "bom.json"
    arr.write_bytes(b"\xef\xbb\xbf" + orjson.dumps(rows))
    for path in (jsonl, arr):
        result = _run(list(iter_items(path)), "alpaca")
        assert len(result.positions) == 1 and not result.rejected


def test_too_many_turns_are_refused():
    turns = [{"role": r, "content": "x" * 60} for _ in range(130) for r in ("user", "assistant")]
    result = _run(
        [(1, orjson.dumps({"messages": turns}))],
        "openai",
        max_output_chars=10**6,
        max_input_chars=10**6,
    )
    assert [(pos, code) for pos, code, _ in result.rejected] == [(1, "too_many_turns")]


def _block_items(path: Path) -> list[tuple[int, bytes]]:
    return [
        (pos, raw)
        for first, block in formats.iter_line_blocks(path)
        for pos, raw in formats.split_lines(first, block)
    ]


def test_jsonl_blocks_give_the_same_lines_and_numbers_as_line_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(formats, "BLOCK_BYTES", 64)  # many blocks, lines across them
    lines = [b'{"a": %d}' % i for i in range(50)]
    lines[7] = b""  # a blank line keeps its number
    lines[20] = b'{"long": "' + b"x" * 500 + b'"}'  # longer than a block
    lines[30] = b'{"crlf": 1}\r'
    body = b"\n".join(lines)  # no final newline
    plain = tmp_path / "a.jsonl"
    plain.write_bytes(formats.BOM + body)
    # Several gzip members with zero padding between them, as `cat a.gz b.gz` makes.
    half = body.index(b"\n", len(body) // 2) + 1
    multi = tmp_path / "b.jsonl.gz"
    multi.write_bytes(gzip.compress(body[:half]) + b"\x00\x00" + gzip.compress(body[half:]))
    expected = [(pos, raw.rstrip(b"\n")) for pos, raw in iter_items(plain)]
    assert _block_items(plain) == expected
    assert _block_items(multi) == expected
    assert len(expected) == 50 and expected[20][0] == 21


def test_broken_and_bomb_gzip_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(formats, "BLOCK_BYTES", 1024)
    data = gzip.compress(b'{"a": 1}\n' * 1000)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(EOFError):
        list(formats.iter_line_blocks(cut))
    junk = tmp_path / "junk.jsonl.gz"
    junk.write_bytes(b"\x1f\x8b" + b"not really gzip")
    with pytest.raises(formats.zlib.error):
        list(formats.iter_line_blocks(junk))
    # 10 MB of zeros in a few KB: inflated a bounded block at a time.
    bomb = tmp_path / "bomb.jsonl.gz"
    bomb.write_bytes(gzip.compress(b"\n" * 10_000_000))
    assert max(len(b) for b in formats._raw_blocks(bomb)) <= 1024


def test_error_text_in_a_batch_in_ascii_and_in_unicode():
    answers = ["fine answer", "Traceback (most recent call last): boom", "ok"]
    assert validate.error_texts(answers) == {1: "Traceback (most recent call last)"}
    mixed = validate.error_texts([*answers, "désolé — I'm sorry, I cannot help"])
    assert mixed == {1: "Traceback (most recent call last)", 3: "I'm sorry, I cannot"}


@pytest.mark.parametrize("size", [1, 7, 16, 64, 1000])
def test_byte_ranges_tile_a_file_into_its_lines(tmp_path: Path, size: int):
    lines = [b'{"a": %d}' % i for i in range(40)]
    lines[3] = b""
    lines[9] = b'{"long": "' + b"y" * 300 + b'"}'
    lines[15] = b'{"crlf": 2}\r'
    path = tmp_path / "a.jsonl"
    path.write_bytes(formats.BOM + b"\n".join(lines))  # no final newline
    total = path.stat().st_size
    got: list[bytes] = []
    for start in range(0, total, size):
        block = formats.read_line_range(path, start, min(total, start + size))
        got += [raw for _, raw in formats.split_lines(1, block)]
    assert got == [raw.rstrip(b"\n") for _, raw in iter_items(path)]


def _inflate_all(path: Path) -> tuple[bytes, str]:
    """Every byte the block reader gives out, and how it stopped (error type and text)."""
    got: list[bytes] = []
    try:
        got.extend(formats._raw_blocks(path))
    except Exception as exc:  # compared, not handled
        return b"".join(got), f"{type(exc).__name__}: {exc}"
    return b"".join(got), ""


def test_isal_inflates_what_zlib_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    assert formats._isal_zlib is not None, "isal (the ingest extra) is not installed"
    monkeypatch.setattr(formats, "BLOCK_BYTES", 4096)  # many steps, members across them
    body = b"".join(b'{"n": %d, "t": "%s"}\n' % (i, b"word " * (i % 40)) for i in range(3000))
    # Several members, zero padding, a member with a name, comment, extra field and header CRC.
    named = zlib.compressobj(9, zlib.DEFLATED, -15)
    deflated = named.compress(body[:999]) + named.flush()
    header = b"\x1f\x8b\x08\x1e" + b"\0" * 4 + b"\0\xff" + b"\x03\x00xyz" + b"name\0note\0"
    header += struct.pack("<H", zlib.crc32(header) & 0xFFFF)
    member = header + deflated + struct.pack("<II", zlib.crc32(body[:999]), 999)
    path = tmp_path / "multi.jsonl.gz"
    path.write_bytes(
        member + gzip.compress(body[999:50_000], 1) + b"\0\0\0" + gzip.compress(body[50_000:], 9)
    )
    assert _inflate_all(path) == (body, "")
    monkeypatch.setattr(formats, "_isal_zlib", None)
    assert _inflate_all(path) == (body, "")


def test_a_damaged_gzip_gives_what_zlib_gave(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Cut short or with a flipped bit anywhere (data, header, CRC, length): the same bytes
    before the damage and the same error as zlib alone, so the same records and rejection."""
    monkeypatch.setattr(formats, "BLOCK_BYTES", 16384)
    body = b"".join(b'{"n": %d, "t": "%s"}\n' % (i, b"text " * (i % 70)) for i in range(4000))
    data = gzip.compress(body[:300_000], 6) + gzip.compress(body[300_000:], 1)
    rng = random.Random(5)
    damaged = [data[:k] for k in (1, 5, 11, 100, len(data) // 2, len(data) - 9, len(data) - 1)]
    for k in [*range(12), *(rng.randrange(len(data)) for _ in range(40)), len(data) - 3]:
        flipped = bytearray(data)
        flipped[k] ^= 1 << rng.randrange(8)
        damaged.append(bytes(flipped))
    path = tmp_path / "damaged.jsonl.gz"
    for case in damaged:
        path.write_bytes(case)
        with_isal = _inflate_all(path)
        with monkeypatch.context() as m:
            m.setattr(formats, "_isal_zlib", None)
            assert with_isal == _inflate_all(path)
