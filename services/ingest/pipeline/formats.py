"""Reading corpus files: JSONL or a JSON array, optionally gzipped, streamed; and turning
Alpaca, OpenAI chat and ShareGPT records into one chat form.

Nothing here holds a whole file: JSONL is read line by line, a JSON array element by element
(ijson's C backend). A record that cannot be parsed or normalised becomes a rejection with
its line (or array position) and never stops the rest of the file.
"""

from __future__ import annotations

import gzip
import importlib
import io
import zlib
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import ijson
import orjson

_isal_zlib: Any
try:  # ISA-L's inflate: the same bytes as zlib's at about twice the speed (the `ingest` extra)
    _isal_zlib = importlib.import_module("isal.isal_zlib")
except ImportError:  # pragma: no cover  (zlib, as before)
    _isal_zlib = None

Format = Literal["alpaca", "openai", "sharegpt"]
FormatChoice = Literal["auto", "alpaca", "openai", "sharegpt"]
FORMATS: tuple[Format, ...] = ("alpaca", "openai", "sharegpt")

# A line or array element past this size is rejected without being parsed.
MAX_RECORD_BYTES = 4 * 1024 * 1024
GZIP_MAGIC = b"\x1f\x8b"
BOM = b"\xef\xbb\xbf"

_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}
_OPENAI_ROLES = frozenset(("system", "user", "assistant"))


class RecordError(ValueError):
    """This record cannot be used; the message is the reason reported for it."""


@dataclass(frozen=True)
class SourceFile:
    """One input file and what applies to all of its records."""

    path: Path
    display_name: str
    format: FormatChoice = "auto"
    domain: str | None = None
    source: str | None = None
    # Records of a previous dataset version: already normalised, scrubbed and split.
    trusted_split: Literal["train", "validation"] | None = None


def open_binary(path: Path) -> BinaryIO:
    """The file's bytes, gunzipped when it starts with the gzip magic number."""
    raw = path.open("rb")
    head = raw.peek(2)[:2] if isinstance(raw, io.BufferedReader) else b""
    if head == GZIP_MAGIC:
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    return raw


def is_json_array(stream: BinaryIO) -> bool:
    """Peek past whitespace: does the content start with ``[``?"""
    peekable = stream if hasattr(stream, "peek") else None
    if peekable is None:
        return False
    head = peekable.peek(4096)  # type: ignore[attr-defined]
    head = head.lstrip()
    return bool(head[:1] == b"[")


Item = tuple[int, bytes | Any]
"""(line number or 1-based array position, raw line bytes or an already parsed element)."""


def iter_items(path: Path) -> Generator[Item, None, None]:
    """Every record of a file with its position: raw lines for JSONL, parsed elements for a
    JSON array. A broken array raises :class:`RecordError` at the element it failed on."""
    with open_binary(path) as stream:
        if stream.peek(3)[:3] == BOM:  # type: ignore[attr-defined]
            stream.read(3)
        if is_json_array(stream):
            position = 0
            try:
                for position, element in enumerate(
                    ijson.items(stream, "item", use_float=True), start=1
                ):
                    # As bytes, like a JSONL line: far cheaper to send to a worker than
                    # the object (and parsed there with the rest of the record's work).
                    try:
                        yield position, orjson.dumps(element)
                    except TypeError:  # a value orjson cannot write: let the worker say so
                        yield position, element
            except ijson.JSONError as exc:
                raise RecordError(f"invalid JSON array after element {position}: {exc}") from exc
            return
        yield from enumerate(stream, start=1)


BLOCK_BYTES = 2 * 1024 * 1024


def _raw_blocks(path: Path) -> Iterator[bytes]:
    """The file's bytes in blocks of at most about BLOCK_BYTES, gunzipped (every member) when
    it starts with the gzip magic number. Output is bounded per step, so a small gzip that
    inflates enormously is read as any large file is."""
    with path.open("rb") as raw:
        if raw.peek(2)[:2] != GZIP_MAGIC:
            while block := raw.read(BLOCK_BYTES):
                yield block
            return
        if _isal_zlib is None:
            yield from _inflated(raw, zlib)
            return
        done = 0  # bytes given out by ISA-L
        try:
            for block in _inflated(raw, _isal_zlib):
                done += len(block)
                yield block
            return
        except (_isal_zlib.error, EOFError):
            pass
        # A damaged or cut-short file: read again by zlib, past what was given out, so the
        # records before the damage and the error reported are zlib's, as they always were.
        raw.seek(0)
        for block in _inflated(raw, zlib):
            if done >= len(block):
                done -= len(block)
                continue
            yield block[done:] if done else block
            done = 0


def _inflated(raw: BinaryIO, inflater: Any) -> Iterator[bytes]:
    """Gunzip ``raw`` (every member) with ``inflater`` (``zlib`` or ``isal_zlib``)."""
    member = inflater.decompressobj(wbits=31)
    started = False
    while data := raw.read(BLOCK_BYTES // 4):
        while data:
            started = True
            out = member.decompress(data, BLOCK_BYTES)
            if out:
                yield out
            if member.eof:  # the next member (gzip skips zero padding between them)
                data = member.unused_data.lstrip(b"\x00")
                member, started = inflater.decompressobj(wbits=31), False
            else:
                data = member.unconsumed_tail
    if started and not member.eof:
        while out := member.decompress(b"", BLOCK_BYTES):  # what is left buffered
            yield out
        if not member.eof:
            raise EOFError("compressed file ended before the end-of-stream marker")


def iter_line_blocks(path: Path) -> Generator[tuple[int, bytes], None, None]:
    """A JSONL file as blocks of whole lines: (number of the block's first line, bytes).
    Splitting blocks into lines is left to whoever processes them (a worker), so reading
    costs no Python work per line. The last block may lack its final newline."""
    line = 1
    pending: list[bytes] = []  # the start of a line that has not ended yet
    held = 0  # its bytes kept: past MAX_RECORD_BYTES it is rejected anyway, so not held whole
    first = True
    for block in _raw_blocks(path):
        if first:
            first = False
            if block.startswith(BOM):
                block = block[len(BOM) :]
        cut = block.rfind(b"\n")
        if cut < 0:  # a line longer than a block: read on until it ends
            if held <= MAX_RECORD_BYTES:
                pending.append(block[: MAX_RECORD_BYTES + 1 - held])
                held += len(pending[-1])
            continue
        view = memoryview(block)
        if held > MAX_RECORD_BYTES:  # end the cut-short line here, then the block's lines
            head = block.find(b"\n")
            whole = b"".join((*pending, b"\n", view[head + 1 : cut + 1]))
        elif pending or cut + 1 < len(block):  # one copy of the block at most
            whole = b"".join((*pending, view[: cut + 1]))
        else:
            whole = block
        pending = [block[cut + 1 :]] if cut + 1 < len(block) else []
        held = len(pending[0]) if pending else 0
        yield line, whole
        line += whole.count(b"\n")
    rest = b"".join(pending)
    if rest:
        yield line, rest


def is_gzip(path: Path) -> bool:
    with path.open("rb") as raw:
        return raw.read(2) == GZIP_MAGIC


_SCAN_BYTES = 1 << 20


def _skip_line(f: BinaryIO, limit: int) -> bool:
    """Move past the next newline, keeping nothing, but not beyond byte ``limit``; True if
    one was found there. Bounded, so ranges inside one huge line cost only their own size."""
    while (at := f.tell()) < limit:
        chunk = f.read(min(_SCAN_BYTES, limit - at))
        if not chunk:
            return False
        cut = chunk.find(b"\n")
        if cut >= 0:
            f.seek(at + cut + 1)
            return True
    return False


def _rest_of_line(f: BinaryIO, keep: int) -> bytes:
    """The rest of the current line (newline included), of which at most ``keep`` bytes are
    kept: a longer line is rejected for its length anyway, so it is never held whole."""
    pieces: list[bytes] = []
    kept = 0
    while chunk := f.read(_SCAN_BYTES):
        cut = chunk.find(b"\n")
        piece = chunk if cut < 0 else chunk[: cut + 1]
        if kept < keep:
            pieces.append(piece[: keep - kept])
            kept += len(pieces[-1])
        if cut >= 0:
            f.seek(f.tell() - len(chunk) + cut + 1)
            if pieces and not pieces[-1].endswith(b"\n"):
                pieces.append(b"\n")
            break
    return b"".join(pieces)


def read_line_range(path: Path, start: int, end: int) -> bytes:
    """The whole lines of an uncompressed file that start at a byte offset in
    ``[start, end)`` (the last one read to its end, or to just past MAX_RECORD_BYTES): ranges
    that tile a file give every line exactly once, so workers can read their part of a file
    themselves."""
    with path.open("rb") as f:
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n" and not _skip_line(f, end):
                return b""  # no line starts in this range
        begin = f.tell()
        if begin >= end:
            return b""
        data = f.read(end - begin)
        if data and not data.endswith(b"\n"):
            last = data.rfind(b"\n") + 1  # where the unfinished line starts
            data += _rest_of_line(f, MAX_RECORD_BYTES + 1 - (len(data) - last))
    if start == 0 and data.startswith(BOM):
        data = data[len(BOM) :]
    return data


def split_lines(first_line: int, block: bytes) -> list[tuple[int, bytes]]:
    """The items of a block from :func:`iter_line_blocks`, as :func:`iter_items` gives them."""
    lines = block.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the block ended with a newline
    return list(enumerate(lines, start=first_line))


def is_json_array_file(path: Path) -> bool:
    with open_binary(path) as stream:
        if stream.peek(3)[:3] == BOM:  # type: ignore[attr-defined]
            stream.read(3)
        return is_json_array(stream)


def parse_line(raw: bytes | Any) -> Any:
    if not isinstance(raw, bytes | bytearray):
        return raw
    if len(raw) > MAX_RECORD_BYTES:
        raise RecordError(f"record longer than {MAX_RECORD_BYTES} bytes")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RecordError(f"invalid JSON: {exc}") from exc


def detect_format(record: Any) -> Format | None:
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "openai"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    return None


def _text(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    # OpenAI content parts: [{"type": "text", "text": "..."}]
    if isinstance(value, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in value
    ):
        return "".join(p["text"] for p in value)
    raise RecordError(f"{what} is not a string")


def normalise(record: Any, fmt: Format) -> list[dict[str, str]]:
    """The record's conversation as ``[{"role", "content"}]``; raises :class:`RecordError`."""
    if not isinstance(record, dict):
        raise RecordError(f"record is a JSON {type(record).__name__}, not an object")
    if fmt == "alpaca":
        if "instruction" not in record or "output" not in record:
            raise RecordError("not an Alpaca record (needs instruction and output)")
        prompt = _text(record["instruction"], "instruction")
        extra = record.get("input")
        if extra not in (None, ""):
            prompt = f"{prompt}\n\n{_text(extra, 'input')}"
        messages = []
        system = record.get("system")
        if system not in (None, ""):
            messages.append({"role": "system", "content": _text(system, "system")})
        messages.append({"role": "user", "content": prompt})
        messages.append({"role": "assistant", "content": _text(record["output"], "output")})
        return messages
    if fmt == "openai":
        turns = record.get("messages")
        if not isinstance(turns, list):
            raise RecordError("not an OpenAI chat record (messages must be a list)")
        out = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise RecordError(f"message {i} is not an object")
            role = turn.get("role")
            if role not in _OPENAI_ROLES:
                raise RecordError(f"message {i} has unsupported role {str(role)[:40]!r}")
            out.append({"role": role, "content": _text(turn.get("content"), f"message {i}")})
        return out
    turns = record.get("conversations")
    if not isinstance(turns, list):
        raise RecordError("not a ShareGPT record (conversations must be a list)")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"turn {i} is not an object")
        speaker = turn.get("from")
        role = _SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
        if role is None:
            raise RecordError(f"turn {i} has unsupported speaker {str(speaker)[:40]!r}")
        out.append({"role": role, "content": _text(turn.get("value"), f"turn {i}")})
    return out


def label(record: Any, *keys: str) -> str | None:
    """A short label (category, domain, source) from the record, if it has a usable one."""
    if not isinstance(record, dict):
        return None
    for key in keys:
        value = record.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()[:200]
    return None
