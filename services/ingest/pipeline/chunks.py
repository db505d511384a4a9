"""The per-record work, done a chunk at a time (in a worker process when there are several
CPUs): parse → normalise → validate → scrub PII → exact key → MinHash bands.

Pure and picklable: a :class:`ChunkJob` in, a :class:`ChunkResult` out. What crosses back
is small: the output JSON line of each kept record, its keys and lengths, and rejections
(position, code, reason) with no record content.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import xxhash

from services.ingest.pipeline import dedupe, fastpass, validate
from services.ingest.pipeline.formats import (
    Format,
    RecordError,
    detect_format,
    label,
    normalise,
    parse_line,
    read_line_range,
    split_lines,
)
from services.ingest.pipeline.pii import PiiScrubber


@dataclass(frozen=True)
class Rules:
    """The processing config as the workers need it (plain data, cheap to pickle)."""

    min_input_chars: int = 50
    max_input_chars: int = 30_000
    min_output_chars: int = 100
    max_output_chars: int = 30_000
    max_turns: int = 256
    reject_error_text: bool = True
    scrub_pii: bool = True
    near_dedupe: bool = True
    num_perm: int = 128
    bands: int = 9
    rows: int = 14
    split_seed: int = 42
    # The compiled pass for the records it can do (see fastpass.py); never changes output.
    fast_path: bool = True


@dataclass(frozen=True)
class ChunkJob:
    items: list[tuple[int, Any]]
    format: Format | None
    domain: str | None
    source: str
    trusted: bool
    rules: Rules
    # JSONL: a block of whole lines and the number of its first line (instead of items).
    block: bytes = b""
    first_line: int = 0
    # Uncompressed JSONL: the lines starting in this byte range of a file, read by the
    # worker (no copy through the main process); positions are then counted from 1.
    path: str = ""
    start: int = 0
    end: int = 0
    # Write the output lines to this file rather than send them back (content then never
    # passes through the main process).
    out_path: str = ""
    # A JSON array's elements at these (start, end) offsets of ``path`` (uint64 pairs), the
    # first at position ``first_line``: read and parsed here, like JSONL lines.
    spans: bytes = b""


@dataclass
class ChunkResult:
    """Column per field, so that sending it back from a worker is cheap to (un)pickle."""

    positions: list[int] = field(default_factory=list)
    record_ids: list[str] = field(default_factory=list)
    # The output JSON lines (newline included), one after the other (unless the job had them
    # written to its ``out_path``), and their lengths.
    lines: bytes = b""
    line_bytes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint32))
    exact_keys: bytes = b""  # 8 bytes per kept record: the first 64 bits of its exact key
    # 8 bytes per record: xxh3-64 of its id seeded with the split seed (its split order).
    split_order: bytes = b""
    # A byte-range job: positions count from its first line; it covered this many lines.
    relative: bool = False
    lines_read: int = 0
    categories: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    input_chars: list[int] = field(default_factory=list)
    output_chars: list[int] = field(default_factory=list)
    rejected: list[tuple[int, str, str]] = field(default_factory=list)
    pii: Counter[str] = field(default_factory=Counter)
    # Per kept record: LSH band keys and the low 8 bits of the MinHash signature.
    band_keys: np.ndarray | None = None
    signatures: np.ndarray | None = None


_Valid = tuple[int, Any, list[dict[str, str]], int, int]
"""(position, parsed record, messages, input chars, output chars)"""


class Rejected(Exception):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


_ROLE_ORDER: dict[tuple[int, bool], list[str]] = {}


def _role_order(n: int, system: bool) -> list[str]:
    """The valid role sequence of ``n`` messages (with a leading system turn or not)."""
    order = _ROLE_ORDER.get((n, system))
    if order is None:
        order = ["system"] if system else []
        order += [("user", "assistant")[i % 2] for i in range(n - system)]
        _ROLE_ORDER[(n, system)] = order
    return order


def _lengths(messages: list[dict[str, str]]) -> tuple[int, int]:
    """(prompt chars, answer chars); raises :class:`Rejected` on an empty turn."""
    input_chars = output_chars = 0
    for m in messages:
        content = m["content"]
        if not content or content.isspace():  # == not content.strip(), without a copy
            raise Rejected("empty_turn", validate.empty_turn_error(messages) or "empty turn")
        if m["role"] == "assistant":
            output_chars += len(content)
        else:
            input_chars += len(content)
    return input_chars, output_chars


def _check(messages: list[dict[str, str]], rules: Rules) -> tuple[int, int]:
    n = len(messages)
    if n > rules.max_turns:
        raise Rejected("too_many_turns", f"{n} messages (> {rules.max_turns})")
    # One comparison with the valid sequence; the precise reason only for a bad one.
    roles = [m["role"] for m in messages]
    if n < 2 or roles != _role_order(n, roles[0] == "system"):
        problem = validate.role_order_error(messages)
        if problem:
            raise Rejected("role_order", problem)
    input_chars, output_chars = _lengths(messages)
    if input_chars < rules.min_input_chars:
        raise Rejected(
            "input_too_short", f"prompt has {input_chars} chars (< {rules.min_input_chars})"
        )
    if input_chars > rules.max_input_chars:
        raise Rejected(
            "input_too_long", f"prompt has {input_chars} chars (> {rules.max_input_chars})"
        )
    if output_chars < rules.min_output_chars:
        raise Rejected(
            "output_too_short", f"answer has {output_chars} chars (< {rules.min_output_chars})"
        )
    if output_chars > rules.max_output_chars:
        raise Rejected(
            "output_too_long", f"answer has {output_chars} chars (> {rules.max_output_chars})"
        )
    return input_chars, output_chars


def _drop_error_answers(valid: list[_Valid], result: ChunkResult) -> list[_Valid]:
    """Reject records whose answers contain error text (one scan for the whole chunk)."""
    answers = [m["content"] for v in valid for m in v[2] if m["role"] == "assistant"]
    owners = [vi for vi, v in enumerate(valid) for m in v[2] if m["role"] == "assistant"]
    drop: dict[int, str] = {}
    for ai, fragment in validate.error_texts(answers).items():
        drop.setdefault(owners[ai], fragment)
    if not drop:
        return valid
    for vi, fragment in drop.items():
        reason = f"answer contains error text {fragment!r}"
        result.rejected.append((valid[vi][0], "error_text", reason))
    result.rejected.sort()
    return [v for vi, v in enumerate(valid) if vi not in drop]


def process_chunk(job: ChunkJob) -> ChunkResult:
    # Nothing here makes reference cycles, and a chunk makes hundreds of thousands of young
    # objects: the cyclic collector would only rescan them (several % of the time).
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _process_chunk(job)
    finally:
        if collecting:
            gc.enable()


def _process_chunk(job: ChunkJob) -> ChunkResult:
    rules = job.rules
    result = ChunkResult()
    block, first_line = job.block, job.first_line
    items: list[tuple[int, Any]] | None = None if job.block else job.items
    if job.spans:
        try:
            items = _array_items(job)
        except OSError as exc:
            result.rejected.append((job.first_line, "file", f"unreadable from here on: {exc}"))
            return result
    elif job.path:
        result.relative = True
        try:
            block, first_line = read_line_range(Path(job.path), job.start, job.end), 1
        except OSError as exc:
            result.rejected.append((1, "file", f"unreadable from here on: {exc}"))
            return result
        items = None
    fast = fastpass.run(job, block, items) if rules.fast_path else None
    if fast is None:
        if items is None:
            items = split_lines(first_line, block)
        result.lines_read = len(items) if job.path else 0
        _python_records(items, job, result).finish(job, result)
        return result
    # The lines the fast pass was not sure about go through the Python path (the reference).
    if items is None:

        def lines_at(index: np.ndarray, spans: np.ndarray) -> list[tuple[int, Any]]:
            where = zip(index.tolist(), spans.tolist(), strict=True)
            return [(first_line + i, block[a:b]) for i, (a, b) in where]

        positions = np.arange(first_line, first_line + fast.lines_read, dtype=np.int64)
    else:
        listed = items

        def lines_at(index: np.ndarray, spans: np.ndarray) -> list[tuple[int, Any]]:
            return [listed[i] for i in index.tolist()]

        positions = np.asarray([p for p, _ in items], dtype=np.int64)
    slow = lines_at(fast.slow, fast.slow_spans)
    done: list[Records] = []
    if len(fast.scrub):
        scrubbed = _scrub_and_finish(fast, positions[fast.scrub], job, result)
        if scrubbed is None:  # not sure after all: the Python path does all of them
            slow = sorted(slow + lines_at(fast.scrub, fast.scrub_spans), key=lambda x: x[0])
        else:
            done.append(scrubbed)
    result.lines_read = fast.lines_read if job.path else 0
    done.append(_python_records(slow, job, result))
    _merge(fast, positions[fast.fast], done).finish(job, result)
    return result


def _scrub_and_finish(
    fast: fastpass.FastColumns, positions: np.ndarray, job: ChunkJob, result: ChunkResult
) -> Records | None:
    """The records the C pass did all but the PII scrub of: scrubbed here (one scan for all),
    then keyed, written and sketched by the C pass again (as trusted OpenAI records with
    their labels; lengths stay those before the scrub, as the Python path has them). None
    if the second pass is not sure of one of them."""
    records = [orjson.loads(line) for line in fast.scrub_lines.splitlines()]
    turns = [m for r in records for m in r["messages"]]
    scrubber = PiiScrubber()
    for i, text in scrubber.scrub_changes([m["content"] for m in turns]).items():
        turns[i]["content"] = text
    block = b"\n".join(map(orjson.dumps, records))
    again = fastpass.run(
        dataclasses.replace(job, format="openai", trusted=True, spans=b""), block, None
    )
    if again is None or len(again.fast) != len(records):
        return None
    result.pii.update(scrubber.counts)
    offsets = np.zeros(len(records) + 1, dtype=np.int64)
    np.cumsum(again.line_bytes, out=offsets[1:])
    return Records(
        positions=positions.tolist(),
        ids=again.ids,
        lines=[again.blob[a:b] for a, b in itertools.pairwise(offsets.tolist())],
        keys=[again.keys[i : i + 8] for i in range(0, len(again.keys), 8)],
        order=[again.order[i : i + 8] for i in range(0, len(again.order), 8)],
        categories=again.categories,
        sources=again.sources,
        input_chars=fast.scrub_input_chars.tolist(),
        output_chars=fast.scrub_output_chars.tolist(),
        signatures=again.signatures,
    )


def _array_items(job: ChunkJob) -> list[tuple[int, Any]]:
    spans = np.frombuffer(job.spans, dtype=np.uint64).astype(np.int64).reshape(-1, 2)
    base = int(spans[0, 0])
    with open(job.path, "rb") as f:
        f.seek(base)
        data = f.read(int(spans[-1, 1]) - base)
    offsets = (spans - base).tolist()
    return [(job.first_line + k, data[a:b]) for k, (a, b) in enumerate(offsets)]


@dataclass
class Records:
    """The kept records of a chunk, in order, as columns (what both paths produce)."""

    positions: list[int] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    lines: list[bytes] = field(default_factory=list)  # output JSON lines, newline included
    keys: list[bytes] = field(default_factory=list)  # first 8 bytes of the exact key
    order: list[bytes] = field(default_factory=list)  # 8 bytes: split order hash
    categories: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    input_chars: list[int] = field(default_factory=list)
    output_chars: list[int] = field(default_factory=list)
    texts: list[bytes] = field(default_factory=list)  # lowercased conversation (MinHash)
    # Set instead of ``lines`` when the lines are one blob already (the fast pass).
    blob: bytes = b""
    line_bytes: np.ndarray | None = None
    # Set instead of ``texts`` when the signatures are computed already (the fast pass).
    signatures: np.ndarray | None = None

    def finish(self, job: ChunkJob, result: ChunkResult) -> None:
        """Into the chunk's result; the lines to the job's file (or back); the sketches."""
        rules = job.rules
        result.positions = self.positions
        result.record_ids = self.ids
        result.categories = self.categories
        result.sources = self.sources
        result.input_chars = self.input_chars
        result.output_chars = self.output_chars
        result.exact_keys = b"".join(self.keys)
        result.split_order = b"".join(self.order)
        blob = self.blob or b"".join(self.lines)
        if job.out_path:
            with open(job.out_path, "wb") as out:
                out.write(blob)
        else:
            result.lines = blob
        if self.line_bytes is not None:
            result.line_bytes = self.line_bytes
        else:
            n = len(self.lines)
            result.line_bytes = np.fromiter(map(len, self.lines), dtype=np.uint32, count=n)
        sigs = self.signatures
        if rules.near_dedupe and sigs is None and self.texts:
            sigs = dedupe.signatures(self.texts, num_perm=rules.num_perm)
        if rules.near_dedupe and sigs is not None and len(sigs):
            result.band_keys = dedupe.band_keys(sigs, rules.bands, rules.rows)
            result.signatures = sigs.astype(np.uint8)


def _python_records(items: list[tuple[int, Any]], job: ChunkJob, result: ChunkResult) -> Records:
    """The reference path: parse, normalise, validate, scrub, key and write each record in
    Python. Rejections and PII counts go to ``result``; the kept records are returned."""
    rules = job.rules
    valid: list[_Valid] = []
    for position, raw in items:
        try:
            if isinstance(raw, bytes | bytearray) and (not raw or raw.isspace()):
                continue  # blank line
            try:
                record = parse_line(raw)
            except RecordError as exc:
                raise Rejected("parse", str(exc)) from exc
            fmt = "openai" if job.trusted else (job.format or detect_format(record))
            if fmt is None:
                raise Rejected("format", "not an Alpaca, OpenAI chat or ShareGPT record")
            try:
                messages = normalise(record, fmt)
            except RecordError as exc:
                raise Rejected("format", str(exc)) from exc
            if job.trusted:
                input_chars, output_chars = _lengths(messages)
            else:
                input_chars, output_chars = _check(messages, rules)
        except Rejected as rej:
            result.rejected.append((position, rej.code, rej.reason))
            continue
        valid.append((position, record, messages, input_chars, output_chars))

    if rules.reject_error_text and not job.trusted:
        valid = _drop_error_answers(valid, result)
    if rules.scrub_pii and not job.trusted:
        # One scan over every message of the chunk (see PiiScrubber.scrub_many).
        scrubber = PiiScrubber()
        turns = [m for v in valid for m in v[2]]
        for i, text in scrubber.scrub_changes([m["content"] for m in turns]).items():
            turns[i]["content"] = text
        result.pii.update(scrubber.counts)

    out = Records()
    ids, categories, sources = out.ids, out.categories, out.sources
    lines, keys, order, texts = out.lines, out.keys, out.order, out.texts
    default_category, default_source = job.domain or "general", job.source
    dumps, newline = orjson.dumps, orjson.OPT_APPEND_NEWLINE
    order_hash, seed = xxhash.xxh3_64_digest, rules.split_seed % 2**64
    conversation_text, exact_key = dedupe.conversation_text, dedupe.exact_key
    for _, record, messages, _, _ in valid:
        # Most records carry no labels: look them up only when a key is there.
        category = default_category
        if "category" in record or "domain" in record:
            category = label(record, "category", "domain") or default_category
        source = (label(record, "source") if "source" in record else None) or default_source
        lowered = conversation_text(messages)
        key = exact_key(lowered)
        record_id = (label(record, "id") if job.trusted else None) or f"r{key.hex()[:24]}"
        lines.append(
            dumps(
                {"id": record_id, "messages": messages, "category": category, "source": source},
                option=newline,
            )
        )
        ids.append(record_id)
        keys.append(key[:8])
        order.append(order_hash(record_id.encode(), seed=seed))
        categories.append(category)
        sources.append(source)
        texts.append(lowered)
    out.positions = [v[0] for v in valid]
    out.input_chars = [v[3] for v in valid]
    out.output_chars = [v[4] for v in valid]
    return out


def _combine(parts: list[Records], num_perm: int | None) -> Records:
    """Several sets of kept records as one, in the order of their positions; with their
    signatures when ``num_perm`` is given."""
    parts = [p for p in parts if p.positions]
    for part in parts:
        if num_perm is not None and part.signatures is None:
            part.signatures = dedupe.signatures(part.texts, num_perm=num_perm)
    if len(parts) <= 1:
        return parts[0] if parts else Records()
    order = np.argsort(np.concatenate([p.positions for p in parts]), kind="stable").tolist()

    def joined(name: str) -> list[Any]:
        every = [x for p in parts for x in getattr(p, name)]
        return [every[i] for i in order]

    return Records(
        positions=joined("positions"),
        ids=joined("ids"),
        lines=joined("lines"),
        keys=joined("keys"),
        order=joined("order"),
        categories=joined("categories"),
        sources=joined("sources"),
        input_chars=joined("input_chars"),
        output_chars=joined("output_chars"),
        signatures=None
        if num_perm is None
        else np.concatenate([p.signatures for p in parts if p.signatures is not None])[order],
    )


def _merge(fast: fastpass.FastColumns, positions: np.ndarray, others: list[Records]) -> Records:
    """The fast pass's records and the others', in the order of their positions."""
    num_perm = None if fast.signatures is None else fast.signatures.shape[1]
    slow = _combine(others, num_perm)
    n_fast, n_slow = len(positions), len(slow.positions)
    if not n_slow:
        return Records(
            positions=positions.tolist(),
            ids=fast.ids,
            keys=[fast.keys],
            order=[fast.order],
            categories=fast.categories,
            sources=fast.sources,
            input_chars=fast.input_chars.tolist(),
            output_chars=fast.output_chars.tolist(),
            blob=fast.blob,
            line_bytes=fast.line_bytes,
            signatures=fast.signatures,
        )
    # Where each Python-path record goes among the fast ones (positions never repeat).
    slow_positions = np.asarray(slow.positions, dtype=np.int64)
    at = np.searchsorted(positions, slow_positions).tolist()
    offsets = np.zeros(n_fast + 1, dtype=np.int64)
    np.cumsum(fast.line_bytes, out=offsets[1:])
    blob = memoryview(fast.blob)
    pieces: list[Any] = []
    last = 0
    for k, a in enumerate(at):
        if a > last:
            pieces.append(blob[int(offsets[last]) : int(offsets[a])])
        pieces.append(slow.lines[k])
        last = a
    pieces.append(blob[int(offsets[last]) :])
    # Fast records are rows 0..n_fast-1 of the concatenations, Python-path ones after them.
    merged = np.argsort(np.concatenate([positions, slow_positions]), kind="stable")
    take = merged.tolist()

    def pick(a: list[Any], b: list[Any]) -> list[Any]:
        both = a + b
        return [both[i] for i in take]

    def pick8(a: bytes, b: list[bytes]) -> list[bytes]:
        both = np.concatenate([np.frombuffer(a, dtype="S8"), np.asarray(b, dtype="S8")])
        return [both[merged].tobytes()]

    sizes = np.fromiter(map(len, slow.lines), dtype=np.uint32, count=n_slow)
    sigs = None
    if fast.signatures is not None and slow.signatures is not None:
        sigs = np.concatenate([fast.signatures, slow.signatures])[merged]
    return Records(
        positions=pick(positions.tolist(), slow.positions),
        ids=pick(fast.ids, slow.ids),
        keys=pick8(fast.keys, slow.keys),
        order=pick8(fast.order, slow.order),
        categories=pick(fast.categories, slow.categories),
        sources=pick(fast.sources, slow.sources),
        input_chars=pick(fast.input_chars.tolist(), slow.input_chars),
        output_chars=pick(fast.output_chars.tolist(), slow.output_chars),
        blob=b"".join(pieces),
        line_bytes=np.concatenate([fast.line_bytes, sizes])[merged],
        signatures=sigs,
    )
