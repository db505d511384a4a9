"""The compiled fast path against the Python path (the reference): the same records, bytes,
ids, rejections and report on ordinary and hostile corpora; its prefilters are supersets of
what the Python checks act on (else PII or error text would slip through); its MinHash is
dedupe.signatures bit for bit; without it ingest runs the Python path and says so once."""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from services.ingest.pipeline import chunks, dedupe, fastpass, validate
from services.ingest.pipeline.chunks import ChunkJob, Rules, process_chunk
from services.ingest.pipeline.formats import SourceFile
from services.ingest.pipeline.pii import PiiScrubber, luhn_ok
from services.ingest.pipeline.run import Pipeline, previous_sources
from services.ingest.settings import ProcessingConfig
from tests.unit.ingest.corpus import sentence

if fastpass.native is None:
    # Where a C compiler is, `pip install -e .` builds it (CI does): its absence is a failure.
    if shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc"):
        pytest.fail(
            f"services.ingest._fastpass not usable ({fastpass._IMPORT_ERROR}); "
            "run pip install -e . to build it",
            pytrace=False,
        )
    pytest.skip("no C compiler here: the fast path is not built", allow_module_level=True)
native: Any = fastpass.native

PII_SNIPPETS = [
    "jane.doe@example.com",
    "(555) 123-4567",
    "555-123-4567",
    "+44 20 7946 0958",
    "123-45-6789",
    "4111 1111 1111 1111",
    "4111-1111-1111-1111",
    "4111111111111111",
    "GB82 WEST 1234 5698 7654 32",
    "DE89370400440532013000",
    "10.20.30.40",
    "2001:db8::ff00:42:8329",
    "fe80::1",
    "::1",
]
ERROR_SNIPPETS = [
    "Traceback (most recent call last):",
    "I'm sorry, but I cannot",
    "im SORRY I can't",
    "I apologise, but I can't",
    "As an AI language model",
    "openai.error.Timeout",
    "Rate limit reached",
    "ratelimit exceeded",
    "insufficient_quota",
    "Error code: 429",
    '{"error": {"message": "x"}}',
    "Bad Gateway",
    "GATEWAY TIMEOUT",
]


def _words(rng: random.Random, n: int) -> str:
    return sentence(rng, n)


def _content(rng: random.Random, lo: int, hi: int) -> str:
    """Mostly plain text; sometimes escapes, unicode, PII, error text or control bytes."""
    text = _words(rng, rng.randint(lo, hi))
    roll = rng.random()
    if roll < 0.05:
        text += " " + rng.choice(PII_SNIPPETS)
    elif roll < 0.08:
        text += " " + rng.choice(ERROR_SNIPPETS)
    elif roll < 0.12:
        text += rng.choice(["\n\ttabbed", ' "quoted" ', " back\\slash ", " a/b ", "\r\n", "\b\f"])
    elif roll < 0.15:
        text += rng.choice([" café", " naïve ✓", " 日本語", " emoji 😀", " \u2028 ", " K"])
    elif roll < 0.17:
        text += rng.choice(["\x00", "\x01\x1f", "\x7f", "\x1c\x1d"])
    elif roll < 0.19:
        text = text.upper()
    elif roll < 0.2:
        text = " \t\n "  # an empty turn
    return text


def _record(rng: random.Random, fmt: str) -> Any:
    prompt, answer = _content(rng, 40, 400), _content(rng, 80, 700)
    roll = rng.random()
    if fmt == "alpaca":
        rec: dict[str, Any] = {"instruction": prompt, "input": "", "output": answer}
        if roll < 0.1:
            rec["input"] = _content(rng, 5, 60)
        elif roll < 0.13:
            rec["input"] = None
        elif roll < 0.15:
            del rec["input"]
        elif roll < 0.17:
            rec["system"] = rng.choice(["Be brief.", "", None, 3])
        elif roll < 0.18:
            rec["input"] = ["not", "a", "string"]
    elif fmt == "openai":
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        if roll < 0.3:
            turns.insert(0, {"role": "system", "content": "You are careful."})
        if roll < 0.1:
            turns += [
                {"role": "user", "content": _content(rng, 10, 80)},
                {"role": "assistant", "content": _content(rng, 10, 200)},
            ]
        elif roll < 0.13:
            turns.reverse()
        elif roll < 0.15:
            turns[0]["content"] = [{"type": "text", "text": prompt}]
        elif roll < 0.16:
            turns[0]["name"] = "x"
        elif roll < 0.17:
            turns[-1]["role"] = "tool"
        elif roll < 0.18:
            turns = turns[:1]
        rec = {"messages": turns}
    else:
        speakers = [("human", "gpt"), ("Human", "GPT"), ("user", "assistant"), ("USER", "model")]
        a, b = rng.choice(speakers)
        turns = [{"from": a, "value": prompt}, {"from": b, "value": answer}]
        if roll < 0.05:
            turns[0]["from"] = "narrator"
        elif roll < 0.07:
            turns.insert(0, {"from": "system", "value": "Rules."})
        rec = {"conversations": turns}
    roll = rng.random()
    if roll < 0.05:
        rec["category"] = rng.choice(["credit", " padded ", "", None, 5, "x" * 300, "crédit"])
    elif roll < 0.08:
        rec["domain"] = rng.choice(["markets", "\tmarkets", None])
    elif roll < 0.1:
        rec["source"] = rng.choice(["crm", "", 'a"quote', None, ["x"]])
    elif roll < 0.12:
        rec["id"] = rng.choice(["my-id", 7, None])
    elif roll < 0.13:
        rec["extra"] = {"nested": [1, 2, {"deep": None}], "n": 1.5}
    return rec


def _line(rng: random.Random, rec: Any) -> bytes:
    """The record as a JSONL line, written in one of several ways (all valid JSON)."""
    roll = rng.random()
    if roll < 0.7:
        return orjson.dumps(rec)
    if roll < 0.8:  # spaced, ASCII-escaped (json.dumps style)
        import json

        return json.dumps(rec, ensure_ascii=True, indent=None).encode()
    if roll < 0.85:
        import json

        return json.dumps(rec, ensure_ascii=False, separators=(", ", " : ")).encode()
    if roll < 0.9:  # escapes the fast pass decodes: \/ and \u00XX for ASCII
        return orjson.dumps(rec).replace(b"/", b"\\/").replace(b"a", b"\\u0061", 3)
    if roll < 0.93:
        return b"  " + orjson.dumps(rec) + b" \r"
    if roll < 0.95:  # duplicate key
        blob = orjson.dumps(rec)
        return blob[:-1] + b',"category":"dup"}' if blob.endswith(b"}") else blob
    if roll < 0.97:  # broken
        blob = orjson.dumps(rec)
        return blob[: rng.randint(1, max(1, len(blob) - 1))]
    return rng.choice(
        [
            b"",
            b"   ",
            b"[1, 2, 3]",
            b'"just a string"',
            b"null",
            b"{}",
            b'{"instruction": "x" "output": "y"}',
            b'{"messages": [}',
            b'{"instruction":"' + b"a" * 100 + b'\\x","output":"' + b"b" * 200 + b'"}',
            b'{"instruction":"\\ud83d\\ude00' + b"a" * 60 + b'","output":"' + b"b" * 200 + b'"}',
            b'{"instruction":"\\ud800' + b"a" * 60 + b'","output":"' + b"b" * 200 + b'"}',
            b"\xff\xfe{}",
            b'{"instruction":"' + b"a" * 60 + b'","output":"' + b"b" * 200 + b'"} trailing',
            b'{"instruction":"' + b"a" * 60 + b'","output":"' + b"\xc3\xa9" * 200 + b'"}',
            b'{"instruction":"' + b"a" * 60 + b'","output":"' + b"b" * 40_000 + b'"}',
            b'{"instruction":"' + b"a" * 60 + b'","output":"tab\there' + b"b" * 200 + b'"}',
        ]
    )


def _corpus(rng: random.Random, fmt: str, n: int) -> list[bytes]:
    lines = [_line(rng, _record(rng, fmt)) for _ in range(n)]
    for _ in range(n // 20):  # exact duplicates
        lines.insert(rng.randrange(len(lines)), rng.choice(lines))
    return lines


def _arrays(tmp: Path, rng: random.Random) -> list[SourceFile]:
    """JSON array files: ones the workers read by element offsets, and ones only ijson may
    read (pretty-printed elements, unicode, exponents, big integers, deep nesting, broken)."""
    import json

    def rows(n: int) -> list[Any]:
        return [_record(rng, rng.choice(["alpaca", "openai", "sharegpt"])) for _ in range(n)]

    def plain(n: int) -> list[Any]:  # ASCII, no odd values: readable by offsets
        return [
            {"instruction": sentence(rng, 90), "input": "", "output": sentence(rng, 200)}
            if i % 2
            else {
                "conversations": [
                    {"from": "human", "value": sentence(rng, 90)},
                    {"from": "gpt", "value": sentence(rng, 300) + " (555) 123-4567"},
                ]
            }
            for i in range(n)
        ]

    variants = {
        "plain": orjson.dumps(plain(300)),
        "compact": orjson.dumps(rows(300)),
        "spaced": b"\xef\xbb\xbf \n[ "
        + b" ,\n ".join(orjson.dumps(r) for r in plain(200))
        + b" ]\n",
        "ascii-escaped": json.dumps(rows(200), ensure_ascii=True).encode(),
        "pretty": json.dumps(rows(100), indent=2).encode(),
        "numbers": b"["
        + b",".join(
            orjson.dumps({**r, "n": v})
            for r, v in zip(rows(60), [1, -0.5, 12, 0, 3.25, 7] * 10, strict=True)
        )
        + b"]",
        "exponent": b"[" + orjson.dumps(rows(1)[0]) + b', {"x": 1e5}]',
        "bigint": b"[" + orjson.dumps(rows(1)[0]) + b', {"x": 123456789012345678901234}]',
        "deep": b"[" + orjson.dumps(rows(1)[0]) + b"," + b"[" * 80 + b"]" * 80 + b"]",
        "broken": orjson.dumps(rows(50))[:-40],
        "trailing": orjson.dumps(rows(20)) + b" x",
        "scalars": b'[1, "two", null, true, [], {}]',
        "empty": b"[]",
        "dupkeys": b'[{"instruction": "' + sentence(rng, 80).encode() + b'", "output": "a", '
        b'"output": "' + sentence(rng, 200).encode() + b'"}]',
    }
    out = []
    for name, data in variants.items():
        path = tmp / f"array-{name}.json"
        path.write_bytes(data)
        out.append(SourceFile(path, path.name, "auto", domain=name))
    # The plain ones are read by offsets (else the fast path was not tested on them).
    assert fastpass.array_spans(tmp / "array-plain.json") is not None
    assert fastpass.array_spans(tmp / "array-spaced.json") is not None
    assert fastpass.array_spans(tmp / "array-exponent.json") is None
    assert fastpass.array_spans(tmp / "array-broken.json") is None
    return out


def _run(tmp: Path, sources: list[SourceFile], fast: bool, **config: Any) -> Any:
    pipe = Pipeline(ProcessingConfig(**config), dataset_name="line")
    pipe.rules = dataclasses.replace(pipe.rules, fast_path=fast)
    return pipe.run(sources, workdir=tmp)


def _same_output(a: Any, b: Any) -> None:
    assert a.dataset_id == b.dataset_id
    for name in ("train_path", "validation_path", "rejects_path"):
        assert getattr(a, name).read_bytes() == getattr(b, name).read_bytes(), name
    ra, rb = dict(a.report), dict(b.report)
    ra.pop("seconds")
    rb.pop("seconds")
    assert ra == rb
    assert a.manifest_paths.keys() == b.manifest_paths.keys()
    for phase, path in a.manifest_paths.items():
        assert path.read_bytes() == b.manifest_paths[phase].read_bytes()


@pytest.mark.parametrize("near", [True, False])
def test_hostile_corpus_gives_the_same_dataset_either_way(tmp_path: Path, near: bool):
    rng = random.Random(11)
    sources = []
    for i, fmt in enumerate(("alpaca", "openai", "sharegpt")):
        lines = _corpus(rng, fmt, 700)
        data = b"\n".join(lines) + b"\n"
        path = tmp_path / f"{fmt}.jsonl"
        path.write_bytes(data)
        sources.append(SourceFile(path, path.name, "auto", domain=f"d{i}"))
    # The same formats as a gzip file (auto-detected), with a forced format, and as a JSON
    # array (elements go through the item path).
    gz = tmp_path / "mixed.jsonl.gz"
    gz.write_bytes(gzip.compress(b"\n".join(_corpus(rng, "sharegpt", 300)) + b"\n"))
    sources.append(SourceFile(gz, gz.name, "sharegpt", source="gz"))
    array = tmp_path / "array.json"
    array.write_bytes(orjson.dumps([_record(rng, "openai") for _ in range(300)]))
    sources.append(SourceFile(array, array.name, "auto", domain='a "quoted" domain'))
    sources += _arrays(tmp_path, rng)
    fast = _run(tmp_path / "fast", sources, True, near_dedupe=near)
    slow = _run(tmp_path / "slow", sources, False, near_dedupe=near)
    _same_output(fast, slow)
    report = fast.report
    # The corpus really is hostile, and the dataset is not empty.
    assert report["records"]["kept"] > 1000
    assert {"parse", "format", "role_order", "empty_turn", "error_text"} <= set(
        report["rejected_by_reason"]
    )
    assert report["pii_scrubbed"]["email"] > 0
    # A second version on top of the first: trusted records go through the fast pass too.
    prev = previous_sources(fast.train_path, fast.validation_path, "line")
    extra = tmp_path / "extra.jsonl"
    extra.write_bytes(b"\n".join(_corpus(rng, "alpaca", 200)) + b"\n")
    more = [SourceFile(extra, extra.name, "auto")]
    pipe_args = {"near_dedupe": near}
    again_fast = Pipeline(ProcessingConfig(**pipe_args), dataset_name="line")
    again_slow = Pipeline(ProcessingConfig(**pipe_args), dataset_name="line")
    again_slow.rules = dataclasses.replace(again_slow.rules, fast_path=False)
    again_fast.rules = dataclasses.replace(again_fast.rules, fast_path=True)
    a = again_fast.run(more, workdir=tmp_path / "fast2", previous=prev)
    b = again_slow.run(more, workdir=tmp_path / "slow2", previous=prev)
    _same_output(a, b)


@pytest.mark.parametrize("fmt", ["alpaca", "openai", "sharegpt", None])
@pytest.mark.parametrize("trusted", [False, True])
def test_chunks_are_the_same_field_by_field(fmt: str | None, trusted: bool):
    rng = random.Random(hash((fmt, trusted)) & 0xFFFF)
    lines = _corpus(rng, fmt or rng.choice(["alpaca", "openai", "sharegpt"]), 400)
    if trusted:  # a previous version's records: openai form with ids and labels
        lines = [
            orjson.dumps(
                {"id": rng.choice(["rabc", " pad", 5, None]), **rec, "category": "c", "source": "s"}
            )
            for rec in (_record(rng, "openai") for _ in range(300))
        ]
    block = b"\n".join(lines) + b"\n"
    rules = Rules(min_input_chars=20, min_output_chars=40)
    job = ChunkJob(
        items=[],
        format=fmt,
        domain="dom",
        source="src",
        trusted=trusted,
        rules=rules,  # type: ignore[arg-type]
        block=block,
        first_line=5,
    )
    fast, slow = _both_paths(job)
    for f in dataclasses.fields(fast):
        a, b = getattr(fast, f.name), getattr(slow, f.name)
        if isinstance(a, np.ndarray):
            assert np.array_equal(a, b), f.name
        else:
            assert a == b, f.name
    # ... and most lines were done by the C pass (else this compares Python with itself).
    done = fastpass.run(job, block, None)
    assert done is not None and len(done.fast) > len(lines) // 4


def _same_both_ways(lines: list[bytes]) -> None:
    """These lines as one block give the same chunk through the C pass as through Python
    (output lines, ids, exact keys, labels), and the C pass did most of them."""
    block = b"\n".join(lines) + b"\n"
    rules = Rules(min_input_chars=20, min_output_chars=40)
    job = ChunkJob(
        items=[], format=None, domain="d", source="s", trusted=False, rules=rules, block=block
    )
    fast, slow = _both_paths(job)
    assert fast.lines and fast.lines == slow.lines and fast.record_ids == slow.record_ids
    assert fast.categories == slow.categories and fast.exact_keys == slow.exact_keys
    done = fastpass.run(job, block, None)
    assert done is not None and len(done.fast) > len(lines) // 2


def test_strings_with_escapes_at_every_offset_are_written_as_orjson_writes_them():
    # The C pass copies 16 plain bytes at a time: an escape before, at and after each block
    # boundary, in contents, labels and ids, one or several in a row.
    rng = random.Random(11)
    lines = []
    for n in range(0, 50):
        for esc in ['"', "\\", "\n", "\t", "\x01", "\x1f", "\x7f", '\\"\n']:
            body = list(sentence(rng, 60).replace("\n", " ")[:n])
            body.insert(rng.randint(0, len(body)), esc)
            text = "".join(body)
            rec = {"instruction": "q " * 20 + text, "input": "", "output": "a " * 30 + text}
            rec |= {"category": text or "c", "id": "r" + text}
            lines.append(orjson.dumps(rec))
    _same_both_ways(lines)


def test_the_fast_pass_does_the_common_case(tmp_path: Path):
    rng = random.Random(3)
    rows = [
        {"instruction": sentence(rng, 80), "input": "", "output": sentence(rng, 200)}
        for _ in range(50)
    ]
    block = b"\n".join(orjson.dumps(r) for r in rows)
    job = ChunkJob(items=[], format=None, domain=None, source="s", trusted=False, rules=Rules())
    done = fastpass.run(job, block, None)
    assert done is not None
    assert len(done.fast) == 50 and not len(done.slow)
    # Anything it is not sure about goes back: PII, error text, non-ASCII, a rejection.
    odd = [
        {"instruction": sentence(rng, 80), "input": "", "output": sentence(rng, 200) + tail}
        for tail in (" mail me: a@b.io", " Bad gateway", " café", "")
    ]
    odd[-1]["instruction"] = "short"
    done = fastpass.run(job, b"\n".join(orjson.dumps(r) for r in odd), None)
    assert done is not None
    assert done.slow.tolist() == [1, 2, 3]
    # A PII candidate is done but for the scrub, which Python does on its texts only.
    assert done.scrub.tolist() == [0] and b"a@b.io" in done.scrub_lines


@pytest.mark.parametrize("domain", ["risk", " padded", "crédit"])
def test_pii_records_are_scrubbed_in_python_and_finished_in_c(domain: str):
    rng = random.Random(4)
    rows = [
        {"instruction": sentence(rng, 80), "input": "", "output": sentence(rng, 200) + pii}
        for pii in ("", " call (555) 123-4567", " mail a.b@c.io", " 10.1.2.3", " 123-45-6789")
    ] * 3
    block = b"\n".join(orjson.dumps(r) for r in rows)
    rules = Rules()
    job = ChunkJob(
        items=[],
        format=None,
        domain=domain,
        source="s",
        trusted=False,
        rules=rules,
        block=block,
        first_line=1,
    )
    fast, slow = _both_paths(job)
    assert fast.lines == slow.lines and fast.pii == slow.pii and fast.pii["phone"] == 3
    assert np.array_equal(fast.signatures, slow.signatures)
    assert fast.input_chars == slow.input_chars and fast.output_chars == slow.output_chars
    # A default label the second pass cannot take as is (padded, non-ASCII): all of them go
    # through the Python path instead, and nothing changes.
    done = fastpass.run(job, block, None)
    assert done is not None and len(done.scrub) == 12
    finished = chunks._scrub_and_finish(done, done.scrub + 1, job, chunks.ChunkResult())
    assert (finished is None) == (domain != "risk")


def _both_paths(job: ChunkJob) -> tuple[Any, Any]:
    """The chunk through the fast path and through the Python path (the reference)."""
    python_rules = dataclasses.replace(job.rules, fast_path=False)
    return process_chunk(job), process_chunk(dataclasses.replace(job, rules=python_rules))


def _luhn_number(rng: random.Random, n: int) -> str:
    digits = [rng.randrange(10) for _ in range(n - 1)]
    for check in range(10):
        if luhn_ok("".join(map(str, [*digits, check]))):
            return "".join(map(str, [*digits, check]))
    raise AssertionError


def _structured(rng: random.Random) -> str:
    """Random PII of each shape, with the fewest digits each allows."""
    d = lambda n: "".join(str(rng.randrange(10)) for _ in range(n))  # noqa: E731
    kind = rng.randrange(6)
    if kind == 0:
        return ".".join(str(rng.choice([0, 1, 9, 10, 99, 100, 255])) for _ in range(4))
    if kind == 1:
        return f"{rng.randint(100, 665)}-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}"
    if kind == 2:
        card = _luhn_number(rng, rng.randint(13, 19))
        sep = rng.choice(["", " ", "-"])
        return sep.join(card[i : i + 4] for i in range(0, len(card), 4))
    if kind == 3:
        return rng.choice(["+1 ", "", "(", "+44 "]) + f"{rng.randint(200, 999)}) {d(3)}-{d(4)}"
    if kind == 4:
        if rng.random() < 0.5:  # eight full groups: no short group, no "::"
            return ":".join(f"{rng.randrange(0x1000, 0x10000):x}" for _ in range(8))
        return ":".join(rng.choice(["", "0", "db8", "ffff", "1"]) for _ in range(rng.randint(3, 8)))
    return rng.choice(["GB82 WEST 1234 5698 7654 32", "DE89370400440532013000"])


def _pii_like(rng: random.Random) -> str:
    """Short strings dense in what PII patterns look for."""
    if rng.random() < 0.3:  # tight against letters or the ends of the text, or spaced
        left, right = rng.choice(["", " ", "x"]), rng.choice(["", " ", "x"])
        return sentence(rng, rng.randint(0, 20)) + left + _structured(rng) + right
    alphabet = rng.choice(
        [
            "0123456789 -.()+",
            "0123456789:abcdefABCDEF",
            "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ",
            "abc0123456789.@-_+",
            "0123456789 -.()+:@ABCxyz\n\t/",
        ]
    )
    body = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
    if rng.random() < 0.5:
        body = rng.choice(PII_SNIPPETS) if rng.random() < 0.5 else body
        cut = rng.randint(0, len(body))
        body = body[:cut] + rng.choice(["", " ", "-", ".", "x", "7"]) + body[cut:]
    return sentence(rng, rng.randint(0, 20)) + " " + body + " " + sentence(rng, rng.randint(0, 20))


def test_pii_prefilter_flags_every_text_the_scrubber_changes():
    rng = random.Random(5)
    changed = 0
    for _ in range(30_000):
        text = _pii_like(rng)
        if PiiScrubber().scrub(text) != text:
            changed += 1
            assert native.pii_candidate(text.encode()), text
    assert changed > 3000  # the generator does produce PII (else the test proves nothing)
    # And it is a filter: plain prose, dates and ranges of years pass.
    assert not native.pii_candidate(sentence(rng, 2000).encode())
    assert not native.pii_candidate(b"from 2023-01-15 to 2024-12-31, in (1990 - 2000), v1.2.3")


_RUN = frozenset(b"0123456789 -.()")


def _pii_rule(b: bytes) -> bool:
    """What pii_candidate is specified to say (see _fastpass.c), one condition at a time."""
    n = len(b)
    if b"@" in b:
        return True
    for i in range(n):  # ':', up to four hex digits, ':'
        if b[i] == 0x3A:
            j = i + 1
            while j < n and j <= i + 4 and chr(b[j]) in "0123456789abcdefABCDEF":
                j += 1
            if j < n and b[j] == 0x3A:
                return True
    for q in range(3, n):  # two capitals, two digits: an IBAN start
        if b[q - 3 : q - 1].isupper() and b[q - 3 : q - 1].isalpha() and b[q - 1 : q + 1].isdigit():
            return True
    i = 0
    while i < n:  # each maximal run of [0-9 -.()] with a digit in it
        if b[i] not in _RUN:
            i += 1
            continue
        start = i
        while i < n and b[i] in _RUN:
            i += 1
        run = b[start:i]
        first = next((k for k, c in enumerate(run) if 0x30 <= c <= 0x39), None)
        if first is None:
            continue
        digits = sum(0x30 <= c <= 0x39 for c in run)
        dots = run[first:].count(b".")
        if len(run) >= 7 and (digits >= 9 or (digits >= 4 and dots >= 3)):
            return True
    return False


def test_pii_prefilter_is_exactly_its_rule_at_every_offset():
    # The C scan jumps 64 bytes at a time to the next digit, '@' or ':': texts of every
    # length up to a few blocks, dense in near misses, against the rule written plainly.
    rng = random.Random(12)
    pieces = [
        "word",
        "Risk",
        "q3",
        " ",
        "  ",
        "-",
        ".",
        "(",
        ")",
        "12",
        "7",
        "2023",
        "GB",
        "G",
        "82",
        ":",
        "ab",
        "ffff",
        "1.2",
        "555",
        "x",
        "\n",
        "A1",
        "12345",
        "1.2.3.4",
        "db8::",
    ]
    flagged = 0
    for _ in range(20_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 60)))
        if rng.random() < 0.02:
            text = text[: rng.randint(0, len(text))] + "@" + text
        data = text.encode()
        want = _pii_rule(data)
        flagged += want
        assert bool(native.pii_candidate(data)) == want, data
    assert 2_000 < flagged < 18_000  # both answers are well represented


def _simd_levels() -> list[str]:
    levels = ["sse2"]
    current = native.simd()
    try:
        native.simd("avx512")
        levels.append("avx512")
    except ValueError:
        pass
    native.simd(current)
    return levels


@pytest.fixture(params=_simd_levels())
def simd(request: pytest.FixtureRequest) -> Any:
    """Each twin of the C pass's vector loops this CPU can run (AVX-512 where it has it)."""
    before = native.simd()
    native.simd(request.param)
    yield request.param
    native.simd(before)


def test_exact_keys_ignore_every_kind_of_whitespace_at_every_offset(simd: str):
    # The C pass lowercases 16 or 64 bytes at a time and drops the key's whitespace word by
    # word with 16-byte stores, or 64 bytes at a time with AVX-512's compress: runs of each
    # whitespace byte, capitals and other bytes at every offset around the block edges, on
    # each twin this CPU can run, against the Python key.
    rng = random.Random(13)
    lines = []
    for n in range(0, 150):
        alphabet = [
            " ",
            "\t",
            "\n",
            "\r",
            "\x0b",
            "\x0c",
            "\x1c",
            "\x1f",
            "A",
            "Z",
            "a",
            "z",
            "#",
            "[",
        ]
        body = "".join(rng.choice(alphabet) for _ in range(n))
        words = "".join(
            rng.choice(["Word ", "tEXT\t", "x", "\n\n", "QQQQQQQQQQQQQQQQ"]) for _ in range(n // 4)
        )
        rec = {"instruction": "Q " * 20 + body + words, "output": "A\t" * 30 + words + body}
        lines.append(orjson.dumps(rec))
    _same_both_ways(lines)


def test_error_prefilter_flags_every_answer_with_error_text():
    rng = random.Random(6)
    hits = 0
    for _ in range(20_000):
        snippet = rng.choice(ERROR_SNIPPETS)
        chars = list(snippet)
        for _ in range(rng.randint(0, 3)):  # mutate: case, drop, space, apostrophe
            i = rng.randrange(len(chars))
            chars[i] = rng.choice([chars[i].swapcase(), "", " ", "'", ","])
        text = sentence(rng, rng.randint(0, 40)) + " " + "".join(chars) + " " + sentence(rng, 9)
        if validate.error_text(text) is not None:
            hits += 1
            assert native.error_candidate(text.lower().encode()), text
    assert hits > 5000
    assert not native.error_candidate(sentence(rng, 2000).encode())


def test_c_minhash_is_dedupe_signatures_bit_for_bit():
    rng = random.Random(7)
    texts = [b"", b"   ", b"one", b"two words", b"exactly three words", b"\x00\x01 a\x7f b\xff"]
    texts += [b"a" * 70_000, b"x " + b"long" * 5000 + b" y z", b" lead and trail "]
    texts += [sentence(rng, rng.randint(1, 3000)).encode() for _ in range(300)]
    texts += [bytes(rng.randrange(256) for _ in range(rng.randint(0, 200))) for _ in range(100)]
    for num_perm in (128, 64, 7):
        expected = dedupe.signatures(texts, num_perm=num_perm)
        args = fastpass.sketch_args(num_perm)
        got = np.stack([np.frombuffer(native.signature(t, *args), dtype=np.uint32) for t in texts])
        assert np.array_equal(got, expected), num_perm


def test_without_the_extension_the_python_path_runs_and_says_so_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    monkeypatch.setattr(fastpass, "native", None)
    monkeypatch.setattr(fastpass, "_logged", False)
    with caplog.at_level(logging.WARNING, logger=fastpass.__name__):
        assert not fastpass.wanted()
        assert not fastpass.wanted()
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "fast path off" in caplog.records[0].getMessage()
    rng = random.Random(8)
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"\n".join(_corpus(rng, "alpaca", 100)))
    job = ChunkJob(items=[], format=None, domain=None, source="s", trusted=False, rules=Rules())
    assert fastpass.run(job, path.read_bytes(), None) is None
    out = Pipeline(ProcessingConfig(), dataset_name="x").run(
        [SourceFile(path, path.name)], workdir=tmp_path / "w"
    )
    assert out.kept > 50


def test_the_environment_can_force_the_python_path(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("INGEST_FAST_PATH", "0")
    assert not fastpass.wanted()
    assert not Pipeline(ProcessingConfig(), dataset_name="x").rules.fast_path
    monkeypatch.setenv("INGEST_FAST_PATH", "1")
    assert fastpass.wanted()
    assert chunks.Rules().fast_path


def test_key_index_in_c_maps_keys_as_the_numpy_one_does(monkeypatch: pytest.MonkeyPatch):
    rng = np.random.default_rng(9)
    in_c = dedupe.KeyIndex(capacity=16)
    monkeypatch.setattr(fastpass, "native", None)
    monkeypatch.setattr(fastpass, "_logged", True)
    in_numpy = dedupe.KeyIndex(capacity=16)
    assert in_c._native is not None and in_numpy._native is None
    keys = np.unique(rng.integers(0, 2**64, size=60_000, dtype=np.uint64))
    keys = rng.permutation(np.concatenate([keys, np.arange(5, dtype=np.uint64)]))
    probe = np.concatenate([keys, rng.integers(0, 2**64, size=5000, dtype=np.uint64)])
    start = 0
    for size in (1, 7, 100, 3000, 20_000, len(keys)):  # grows several times on the way
        batch = keys[start : start + size]
        rows = np.arange(start, start + len(batch), dtype=np.int64)
        for index in (in_c, in_numpy):
            index.add(batch[: len(batch)], rows)
        start += len(batch)
        assert np.array_equal(in_c.lookup(probe), in_numpy.lookup(probe))
    assert (in_c.lookup(keys) >= 0).all()


def test_mutated_bytes_never_crash_and_still_give_the_same_chunk():
    """Byte flips, cuts and insertions in valid lines: the C pass must never crash (a crash
    would take the worker, and the whole ingest, with it) and must still agree with Python."""
    rng = random.Random(10)
    base = [
        orjson.dumps(_record(rng, rng.choice(["alpaca", "openai", "sharegpt"]))) for _ in range(60)
    ]
    noise = b'"\\{}[]:,u0123456789abcdefnrt \x00\x7f\xc3\xa9\xff'
    for round_ in range(25):
        lines = []
        for line in base:
            data = bytearray(line)
            for _ in range(rng.randint(1, 4)):
                at = rng.randrange(len(data))
                op = rng.random()
                if op < 0.4:
                    data[at] = rng.choice(noise)
                elif op < 0.7:
                    data.insert(at, rng.choice(noise))
                elif op < 0.85:
                    del data[at]
                else:
                    data = data[:at]
                    break
            lines.append(bytes(data).replace(b"\n", b" "))
        rules = Rules(min_input_chars=10, min_output_chars=10)
        job = ChunkJob(
            items=[],
            format=None,
            domain="d",
            source="s",
            trusted=bool(round_ % 5 == 0),
            rules=rules,
            block=b"\n".join(lines),
            first_line=1,
        )
        fast, slow = _both_paths(job)
        assert fast.lines == slow.lines and fast.rejected == slow.rejected
        assert fast.record_ids == slow.record_ids and fast.exact_keys == slow.exact_keys
