"""The compiled fast path of the per-record work (``services/ingest/_fastpass.c``).

One C pass over a chunk's bytes does, for every line of a known shape, what the Python path
does (parse, normalise, validate, exact key, id, split order, output line, MinHash
signature) and hands every line it is not sure about back to the Python path, which stays
the reference: records with a possible PII span or error text, that would be rejected, with
non-ASCII text, unusual keys or escapes. Output is byte for byte the same either way
(tests/unit/ingest/test_fastpass.py). The same module locates the elements of plain JSON
arrays (:func:`array_spans`) and probes dedupe's key tables (``dedupe.KeyIndex``).

Off when the extension was not built (no compiler at install time: ingest logs it once and
runs the Python path) or when ``INGEST_FAST_PATH=0``.
"""

from __future__ import annotations

import functools
import importlib
import logging
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from services.ingest.pipeline import formats

if TYPE_CHECKING:
    from services.ingest.pipeline.chunks import ChunkJob

log = logging.getLogger(__name__)

_FORMAT_CODES = {None: 0, "alpaca": 1, "openai": 2, "sharegpt": 3}

# The interface this module speaks (FASTPASS_ABI in _fastpass.c); bump both together.
ABI = 2

native: ModuleType | None
try:
    native = importlib.import_module("services.ingest._fastpass")
    _IMPORT_ERROR = ""
    if getattr(native, "ABI", None) != ABI:  # built from an older _fastpass.c: rebuild it
        _IMPORT_ERROR = f"stale build (ABI {getattr(native, 'ABI', None)}, want {ABI})"
        native = None
except ImportError as exc:  # not built (no compiler when installed): the Python path only
    native = None
    _IMPORT_ERROR = str(exc)

_logged = False


def wanted() -> bool:
    """Use the fast path? False when ``INGEST_FAST_PATH`` is 0/false/no/off or the extension
    is not there (said once in the log, with why)."""
    global _logged
    if os.environ.get("INGEST_FAST_PATH", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if native is None:
        if not _logged:
            _logged = True
            log.warning(
                "ingest fast path off (%s; pip install -e . builds it); using the Python path",
                _IMPORT_ERROR,
            )
        return False
    return True


@dataclass
class FastColumns:
    """What the C pass did with a chunk: the records it finished (indices into the chunk's
    lines, ``fast``) as columns, and the indices it left to Python (``slow``)."""

    lines_read: int
    fast: np.ndarray  # int64 line indices, ascending
    slow: np.ndarray
    slow_spans: np.ndarray  # (len(slow), 2) int64: where each slow line is in the block
    # Lines done but for the PII scrub: indices, spans, each record in chat form with its
    # labels (an OpenAI JSON line), its lengths before the scrub.
    scrub: np.ndarray
    scrub_spans: np.ndarray
    scrub_lines: bytes
    scrub_input_chars: np.ndarray
    scrub_output_chars: np.ndarray
    blob: bytes  # the output lines of the fast records, one after the other
    line_bytes: np.ndarray  # uint32
    keys: bytes  # 8 bytes per record
    order: bytes  # 8 bytes per record
    ids: list[str]
    categories: list[str]
    sources: list[str]
    input_chars: np.ndarray  # uint32
    output_chars: np.ndarray
    signatures: np.ndarray | None  # (records, num_perm) uint32, as dedupe.signatures


def run(job: ChunkJob, block: bytes, items: list[tuple[int, Any]] | None) -> FastColumns | None:
    """The C pass over a JSONL block, or over a JSON array's items (as bytes, one per
    line); None when it cannot take this chunk (the Python path does all of it)."""
    if native is None:
        return None
    if items is not None:
        raws = [raw for _, raw in items]
        if not all(type(raw) is bytes and b"\n" not in raw for raw in raws):
            return None
        block = b"\n".join(raws)
    rules = job.rules
    category = job.domain or "general"
    try:
        category_json, source_json = orjson.dumps(category), orjson.dumps(job.source)
    except TypeError:
        return None
    out = native.process(
        block,
        _FORMAT_CODES.get(job.format, 0),
        int(job.trusted),
        rules.min_input_chars,
        rules.max_input_chars,
        rules.min_output_chars,
        rules.max_output_chars,
        rules.max_turns,
        rules.reject_error_text,
        rules.scrub_pii,
        rules.split_seed % 2**64,
        formats.MAX_RECORD_BYTES,
        category,
        job.source,
        category_json,
        source_json,
        *(sketch_args(rules.num_perm) if rules.near_dedupe else (0, 0, b"")),
    )
    (lines_read, fast, slow, spans, scrub, scrub_spans, scrub_lines, scrub_in, scrub_out) = out[:9]
    (blob, line_bytes, keys, order, ids, cats, srcs, ins, outs, sigs) = out[9:]
    return FastColumns(
        lines_read=lines_read,
        fast=np.frombuffer(fast, dtype=np.uint32).astype(np.int64),
        slow=np.frombuffer(slow, dtype=np.uint32).astype(np.int64),
        slow_spans=np.frombuffer(spans, dtype=np.uint64).astype(np.int64).reshape(-1, 2),
        scrub=np.frombuffer(scrub, dtype=np.uint32).astype(np.int64),
        scrub_spans=np.frombuffer(scrub_spans, dtype=np.uint64).astype(np.int64).reshape(-1, 2),
        scrub_lines=scrub_lines,
        scrub_input_chars=np.frombuffer(scrub_in, dtype=np.uint32),
        scrub_output_chars=np.frombuffer(scrub_out, dtype=np.uint32),
        blob=blob,
        line_bytes=np.frombuffer(line_bytes, dtype=np.uint32),
        keys=keys,
        order=order,
        ids=ids,
        categories=cats,
        sources=srcs,
        input_chars=np.frombuffer(ins, dtype=np.uint32),
        output_chars=np.frombuffer(outs, dtype=np.uint32),
        signatures=(
            np.frombuffer(sigs, dtype=np.uint32).reshape(-1, rules.num_perm)
            if rules.near_dedupe
            else None
        ),
    )


@functools.cache
def sketch_args(num_perm: int) -> tuple[int, int, bytes]:
    """(num_perm, salt, probe table) for the C MinHash, from dedupe's own definitions."""
    from services.ingest.pipeline import dedupe  # dedupe uses this module: import when used

    salt = int(dedupe.signature_salt())
    probes = dedupe.probes(num_perm).astype(np.int32).tobytes()
    return num_perm, salt, probes


def array_spans(path: Path) -> np.ndarray | None:
    """The (start, end) byte offsets of the elements of an uncompressed JSON array file, as
    (n, 2) int64, when all of it is in the subset of JSON on which ijson (the reference
    reader) and orjson agree (see ``array_elements`` in _fastpass.c): workers then read and
    parse the elements themselves, as they do JSONL lines. None = read it with ijson."""
    if native is None:
        return None
    with path.open("rb") as f:
        if f.read(2) == formats.GZIP_MAGIC or not f.seek(0, os.SEEK_END):
            return None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            spans = native.array_elements(data, formats.MAX_RECORD_BYTES // 2)
    if spans is None:
        return None
    return np.frombuffer(spans, dtype=np.uint64).astype(np.int64).reshape(-1, 2)
