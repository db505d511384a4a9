"""The ingest pipeline end to end, streaming: files in, a dataset version's files out.

Reading and the dedupe decisions happen here, in order; the per-record work
(:func:`~services.ingest.pipeline.chunks.process_chunk`) runs a chunk at a time, in worker
processes when an executor is given. Output lines go to a file per chunk on disk, so memory
holds only a few dozen bytes per record (ids, keys, labels, lengths) plus the LSH index.

Records of the previous version of the dataset line are read first, as trusted input: they
keep their split, and anything in the new files that duplicates them is dropped. So
re-ingesting the same content reproduces the previous version byte for byte.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import itertools
import os
import time
import zlib
from array import array
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from itertools import compress
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from services.ingest.pipeline import curriculum, dedupe, fastpass
from services.ingest.pipeline.chunks import ChunkJob, ChunkResult, Rules, process_chunk
from services.ingest.pipeline.formats import (
    BLOCK_BYTES,
    Format,
    Item,
    RecordError,
    SourceFile,
    detect_format,
    is_gzip,
    is_json_array_file,
    iter_items,
    iter_line_blocks,
    parse_line,
    split_lines,
)
from services.ingest.pipeline.pii import PII_TYPES
from services.ingest.settings import ProcessingConfig

CHUNK_RECORDS = 2048
DETECT_WINDOW = 1000
MAX_REPORTED_REJECTIONS = 200


@dataclass
class PipelineOutput:
    workdir: Path
    report: dict[str, Any]
    train_path: Path
    validation_path: Path
    report_path: Path
    rejects_path: Path
    manifest_paths: dict[str, Path]
    dataset_id: str | None
    train_count: int
    validation_count: int
    new_records: int
    counts_by_category: dict[str, int]
    counts_by_source: dict[str, int]

    @property
    def kept(self) -> int:
        return self.train_count + self.validation_count


@dataclass
class _Meta:
    """What is remembered of each kept record (its content is in its chunk file), by row."""

    ids: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)  # interned: one object per value
    sources: list[str] = field(default_factory=list)
    input_chars: array[int] = field(default_factory=lambda: array("I"))
    output_chars: array[int] = field(default_factory=lambda: array("I"))
    # 0 = new record (split to be decided), 1 = previous train, 2 = previous validation.
    fixed_split: bytearray = field(default_factory=bytearray)
    # Where the record came from, for reports: file index and line (or array position).
    file: array[int] = field(default_factory=lambda: array("H"))
    position: array[int] = field(default_factory=lambda: array("q"))
    category_codes: array[int] = field(default_factory=lambda: array("I"))
    # Per chunk: the kept records' split order hashes.
    split_order: list[np.ndarray] = field(default_factory=list)


def rules_for(config: ProcessingConfig) -> Rules:
    bands, rows = dedupe.lsh_params(config.near_threshold, config.num_perm)
    return Rules(
        min_input_chars=config.min_input_chars,
        max_input_chars=config.max_input_chars,
        min_output_chars=config.min_output_chars,
        max_output_chars=config.max_output_chars,
        max_turns=config.max_turns,
        reject_error_text=config.reject_error_text,
        scrub_pii=config.scrub_pii,
        near_dedupe=config.near_dedupe,
        num_perm=config.num_perm,
        bands=bands,
        rows=rows,
        split_seed=config.split_seed,
        fast_path=fastpass.wanted(),
    )


def previous_sources(train: Path, validation: Path, name: str) -> list[SourceFile]:
    return [
        SourceFile(train, f"{name}/train.jsonl", "openai", trusted_split="train"),
        SourceFile(validation, f"{name}/validation.jsonl", "openai", trusted_split="validation"),
    ]


def _percentiles(values: Sequence[int]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values)
    qs = np.percentile(arr, [5, 25, 50, 75, 95])
    return {
        "min": int(arr.min()),
        "p5": float(qs[0]),
        "p25": float(qs[1]),
        "p50": float(qs[2]),
        "p75": float(qs[3]),
        "p95": float(qs[4]),
        "max": int(arr.max()),
        "mean": round(float(arr.mean()), 1),
    }


_FILE_ERRORS = (RecordError, OSError, EOFError, zlib.error, gzip.BadGzipFile)


def _raising(exc: BaseException) -> Iterator[Item]:
    raise exc
    yield  # pragma: no cover  (makes this a generator)


def _runs(sizes: np.ndarray, split: np.ndarray, code: int) -> tuple[list[int], list[int]]:
    """Where the runs of consecutive lines of split ``code`` lie in a chunk file: their
    start and end byte offsets."""
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    edges = np.flatnonzero(np.diff(np.r_[False, split == code, False]))
    return offsets[edges[0::2]].tolist(), offsets[edges[1::2]].tolist()


def _read_chunk(name: str, into: memoryview) -> memoryview:
    """Fill ``into`` (as long as the chunk file's lines) with a chunk file's bytes.
    Whichever of :func:`split_digest` and :func:`write_splits` is done with a chunk file
    first renames it, so look under both names."""
    try:
        f = open(name, "rb", buffering=0)  # noqa: SIM115  (closed below; either name)
    except FileNotFoundError:
        f = open(name + ".done", "rb", buffering=0)  # noqa: SIM115
    with f:
        got = 0
        while got < len(into):
            more = f.readinto(into[got:])
            if not more:
                raise OSError(f"chunk file {name} is shorter than its lines")
            got += more
    return into


def _chunk_buffer(plan: list[tuple[str, np.ndarray, np.ndarray]]) -> memoryview:
    """A buffer for the longest chunk file of ``plan``."""
    longest = max((int(sizes.sum()) for _, sizes, _ in plan), default=0)
    return memoryview(bytearray(longest))


def _done_with(name: str) -> None:
    """The second of the two jobs to be done with a chunk file deletes it (the first renames
    it: atomic, so exactly one of them finds it gone)."""
    try:
        os.rename(name, name + ".done")
    except FileNotFoundError:  # renamed by the other one (or never written: nothing kept)
        Path(name + ".done").unlink(missing_ok=True)


def split_digest(plan: list[tuple[str, np.ndarray, np.ndarray]], code: int) -> str:
    """The sha256 hex digest of the split file ``code`` (1 = train, 2 = validation; see
    :meth:`Pipeline._split_plan`) as :func:`write_splits` writes it, from the chunk files.
    Runs beside :func:`write_splits` (another worker): the train file's hash is most of the
    time after the last chunk, and nothing but hashing is left in its way."""
    digest = hashlib.sha256()
    buffer = _chunk_buffer(plan)
    for name, sizes, split in plan:
        starts, ends = _runs(sizes, split, code)
        if starts:
            view = _read_chunk(name, buffer[: int(sizes.sum())])
            _done_with(name)
            for a, b in zip(starts, ends, strict=True):
                digest.update(view[a:b])
        else:
            _done_with(name)
    return digest.hexdigest()


def write_splits(
    plan: list[tuple[str, np.ndarray, np.ndarray]],
    train_path: Path,
    validation_path: Path,
    *,
    digest_of: int,
) -> str:
    """Copy each chunk's kept lines into the split files (split 1 = train, 2 = validation;
    see :meth:`Pipeline._split_plan`), in order; the sha256 hex digest of split
    ``digest_of``. With :func:`split_digest` over the same plan, every chunk file is
    deleted once both are done with it."""
    digest = hashlib.sha256()
    buffer = _chunk_buffer(plan)
    with train_path.open("wb") as train_out, validation_path.open("wb") as val_out:
        outs = {1: train_out, 2: val_out}
        for name, sizes, split in plan:
            view = None
            for code, out in outs.items():
                starts, ends = _runs(sizes, split, code)
                if not starts:
                    continue
                if view is None:
                    view = _read_chunk(name, buffer[: int(sizes.sum())])
                pieces = [view[a:b] for a, b in zip(starts, ends, strict=True)]
                if code == digest_of:
                    for piece in pieces:
                        digest.update(piece)
                # One system call per split and chunk (not per run: thousands of them).
                out.write(b"".join(pieces))
            _done_with(name)
    return digest.hexdigest()


def _objects(values: list[str]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _counts_by_first_seen(codes: np.ndarray, names: list[str]) -> dict[str, int]:
    """``dict(Counter(names[c] for c in codes))``: counts in order of first appearance."""
    if not len(codes):
        return {}
    values, first, counts = np.unique(codes, return_index=True, return_counts=True)
    order = np.argsort(first)
    return {names[int(c)]: int(n) for c, n in zip(values[order], counts[order], strict=True)}


class Pipeline:
    """One run: ``Pipeline(config, ...).run(sources, ...)``."""

    def __init__(
        self,
        config: ProcessingConfig,
        *,
        dataset_name: str,
        executor: Executor | None = None,
        max_in_flight: int = 4,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.config = config
        self.dataset_name = dataset_name
        self.rules = rules_for(config)
        self.executor = executor
        self.max_in_flight = max_in_flight
        self.progress = progress
        self.meta = _Meta()
        # First 64 bits of each kept record's exact key → its row.
        self.exact = dedupe.KeyIndex()
        self._files: list[str] = []
        self._interned: dict[str, str] = {}
        self._category_code: dict[str, int] = {}
        self._line_offset: dict[int, int] = {}  # per input (its stats dict): lines read
        self.near = dedupe.NearDuplicateIndex(
            threshold=config.near_threshold, num_perm=config.num_perm
        )
        self.rejected_by_code: Counter[str] = Counter()
        self.rejected_examples: list[dict[str, Any]] = []
        self.pii: Counter[str] = Counter()
        self.inputs: list[dict[str, Any]] = []
        self.timings: defaultdict[str, float] = defaultdict(float)
        self.empty_outputs = 0
        self._rejects_file: Any = None
        # Per chunk, in order: its lines' file, their lengths, which records were kept.
        self._chunks: list[tuple[Path, np.ndarray, np.ndarray]] = []
        self._chunk_dir = Path()

    # ---------------------------------------------------------------- reading

    def _detect(self, items: Iterator[Item]) -> tuple[Format | None, Iterator[Item]]:
        """The format of the first recognisable record (looking at most DETECT_WINDOW)."""
        buffered: list[Item] = []
        found: Format | None = None
        try:
            for item in items:
                buffered.append(item)
                try:
                    found = detect_format(parse_line(item[1]))
                except RecordError:
                    found = None
                if found or len(buffered) >= DETECT_WINDOW:
                    break
        except _FILE_ERRORS as exc:  # surfaces again, in order, where the caller reads on
            return found, itertools.chain(buffered, _raising(exc))
        return found, itertools.chain(buffered, items)

    @staticmethod
    def _detect_lines(path: Path) -> Format | None:
        """The format of the first recognisable line of a JSONL file (looking at most
        DETECT_WINDOW lines), read by the block reader, which never holds a huge line
        whole; unreadable from the start = unknown (reading it again reports why)."""
        blocks = iter_line_blocks(path)
        seen = 0
        try:
            for first, block in blocks:
                for _, raw in split_lines(first, block):
                    try:
                        found = detect_format(parse_line(raw))
                    except RecordError:
                        found = None
                    seen += 1
                    if found or seen >= DETECT_WINDOW:
                        return found
        except _FILE_ERRORS:
            return None
        finally:
            blocks.close()
        return None

    def _jobs(self, src: SourceFile, stats: dict[str, Any]) -> Iterator[ChunkJob]:
        fmt: Format | None = None if src.format == "auto" else src.format
        detect = fmt is None and src.trusted_split is None
        source = src.source or Path(src.display_name).name.split(".")[0] or "upload"
        try:
            array = is_json_array_file(src.path)
        except _FILE_ERRORS:
            array = True  # the item reader reports it, with its position
        if not array:  # JSONL: whole blocks of lines (or byte ranges) to the workers
            if detect:
                fmt = self._detect_lines(src.path)
            stats["format"] = fmt or "unknown"
            if is_gzip(src.path):
                yield from self._block_jobs(src, fmt, source)
            else:
                yield from self._range_jobs(src, fmt, source)
            return
        spans = fastpass.array_spans(src.path) if self.rules.fast_path else None
        if spans is not None:  # elements the workers can read and parse themselves
            yield from self._array_jobs(src, spans, fmt, source, stats, detect=detect)
            return
        items: Iterator[Item] = iter_items(src.path)
        if detect:
            fmt, items = self._detect(items)
        stats["format"] = fmt or "unknown"
        position = 0
        chunk: list[Item] = []
        try:
            for item in items:
                position = item[0]
                chunk.append(item)
                if len(chunk) >= CHUNK_RECORDS:
                    yield self._job(fmt, src, source, chunk)
                    chunk = []
        except _FILE_ERRORS as exc:
            self._reject(src.display_name, position, "file", f"unreadable from here on: {exc}")
        if chunk:
            yield self._job(fmt, src, source, chunk)

    def _array_jobs(
        self,
        src: SourceFile,
        spans: np.ndarray,
        fmt: Format | None,
        source: str,
        stats: dict[str, Any],
        *,
        detect: bool,
    ) -> Iterator[ChunkJob]:
        """A JSON array by element offsets (see :func:`fastpass.array_spans`): the same
        records, positions and format detection as reading it with ijson."""
        if detect:
            with src.path.open("rb") as f:
                for start, end in spans[:DETECT_WINDOW].tolist():
                    f.seek(start)
                    try:
                        fmt = detect_format(parse_line(f.read(end - start)))
                    except RecordError:
                        fmt = None
                    if fmt:
                        break
        stats["format"] = fmt or "unknown"
        for lo in range(0, len(spans), CHUNK_RECORDS):
            yield self._job(
                fmt,
                src,
                source,
                path=str(src.path),
                spans=spans[lo : lo + CHUNK_RECORDS].astype(np.uint64).tobytes(),
                first_line=lo + 1,
            )

    def _range_jobs(self, src: SourceFile, fmt: Format | None, source: str) -> Iterator[ChunkJob]:
        size = src.path.stat().st_size
        for start in range(0, size, BLOCK_BYTES):
            end = min(size, start + BLOCK_BYTES)
            yield self._job(fmt, src, source, path=str(src.path), start=start, end=end)

    def _block_jobs(self, src: SourceFile, fmt: Format | None, source: str) -> Iterator[ChunkJob]:
        first_line, block = 1, b""
        try:
            for first_line, block in iter_line_blocks(src.path):
                yield self._job(fmt, src, source, block=block, first_line=first_line)
        except _FILE_ERRORS as exc:
            line = first_line + block.count(b"\n") - 1 if block else 0  # the last line read
            self._reject(src.display_name, line, "file", f"unreadable from here on: {exc}")

    def _job(
        self,
        fmt: Format | None,
        src: SourceFile,
        source: str,
        items: list[Item] | None = None,
        **where: Any,
    ) -> ChunkJob:
        """One chunk of ``src``: parsed ``items``, or where its records lie (``path`` with
        ``spans`` or ``start``/``end``, or a ``block`` of lines). A ``fmt`` of None (nothing
        recognisable) rejects every record with the reason."""
        return ChunkJob(
            items=items if items is not None else [],
            format=fmt,
            domain=src.domain,
            source=source,
            trusted=src.trusted_split is not None,
            rules=self.rules,
            **where,
        )

    # ---------------------------------------------------------------- deciding

    def _reject(self, file: str, position: int, code: str, reason: str) -> None:
        self.rejected_by_code[code] += 1
        entry = {"file": file, "line": position, "code": code, "reason": reason}
        if len(self.rejected_examples) < MAX_REPORTED_REJECTIONS:
            self.rejected_examples.append(entry)
        self._rejects_file.write(orjson.dumps(entry) + b"\n")
        if code == "empty_turn" and "assistant" in reason:
            self.empty_outputs += 1

    def _label(self, row: int) -> str:
        return f"{self._files[self.meta.file[row]]}:{self.meta.position[row]}"

    def _consume(
        self, result: ChunkResult, src: SourceFile, stats: dict[str, Any], out_path: Path
    ) -> None:
        started = time.perf_counter()
        name = src.display_name
        if result.relative:  # a byte-range job: its lines follow those of the ones before
            offset = self._line_offset.get(id(stats), 0)
            self._line_offset[id(stats)] = offset + result.lines_read
            if offset:
                result.positions = [p + offset for p in result.positions]
                result.rejected = [(p + offset, c, r) for p, c, r in result.rejected]
        for position, code, reason in result.rejected:
            self._reject(name, position, code, reason)
        self.pii.update(result.pii)
        split_code = {"train": 1, "validation": 2}.get(src.trusted_split or "", 0)
        if not self._files or self._files[-1] != name:
            self._files.append(name)
        file_index = len(self._files) - 1
        n = len(result.positions)
        positions = result.positions
        # Exact duplicates of kept records (index) and of earlier records of this chunk.
        exact = np.frombuffer(result.exact_keys, dtype="<u8")
        earlier = self.exact.lookup(exact)
        _, first_in_chunk, inverse = np.unique(exact, return_index=True, return_inverse=True)
        first_in_chunk = first_in_chunk[inverse]
        keys, sigs = result.band_keys, result.signatures
        near = self.rules.near_dedupe and keys is not None and sigs is not None
        suspect = (earlier >= 0) | (first_in_chunk != np.arange(n))
        if near and keys is not None:
            found, check = self.near.check_chunk(keys)
            suspect |= check
        # Only suspects are looked at one by one; every other record is kept as it is.
        base = len(self.meta.ids)
        rejected = np.zeros(n, dtype=bool)
        pending: dict[int, int] = {}  # bands of this chunk's checked, kept rows → row
        chunk_index: dict[int, int] = {}  # row → index in this chunk, for their labels
        dropped = 0
        for i in np.flatnonzero(suspect).tolist():
            position = positions[i]
            why = ""
            if earlier[i] >= 0:
                why = f"duplicate of {self._label(int(earlier[i]))}"
            elif first_in_chunk[i] != i:
                why = f"duplicate of {name}:{positions[int(first_in_chunk[i])]}"
            if why:
                self._reject(name, position, "exact_duplicate", why)
                rejected[i] = True
                dropped += 1
                continue
            row = base + i - dropped
            if near and keys is not None and sigs is not None and check[i]:
                band_row = keys[i].tolist()
                candidates = {c for c in found[i].tolist() if c >= 0}
                candidates.update(pending[k] for k in band_row if k in pending)
                similar = self.near.similar(candidates, sigs[i])
                if similar is not None:
                    where = (
                        f"{name}:{positions[chunk_index[similar]]}"
                        if similar in chunk_index
                        else self._label(similar)
                    )
                    self._reject(name, position, "near_duplicate", f"near-duplicate of {where}")
                    rejected[i] = True
                    dropped += 1
                    continue
                for b, key in enumerate(band_row):
                    if found[i, b] < 0:
                        pending.setdefault(key, row)
                chunk_index[row] = i
                self.near.store(np.asarray([row]), sigs[i : i + 1])
        kept = ~rejected
        rows = np.full(n, -1, dtype=np.int64)
        rows[kept] = base + np.arange(int(kept.sum()))
        take = kept.tolist()
        meta, intern, cat_code = self.meta, self._interned, self._category_code
        meta.ids.extend(compress(result.record_ids, take))
        categories = [intern.setdefault(c, c) for c in compress(result.categories, take)]
        meta.categories.extend(categories)
        meta.category_codes.extend([cat_code.setdefault(c, len(cat_code)) for c in categories])
        meta.sources.extend(intern.setdefault(c, c) for c in compress(result.sources, take))
        meta.input_chars.extend(compress(result.input_chars, take))
        meta.output_chars.extend(compress(result.output_chars, take))
        meta.position.extend(compress(positions, take))
        meta.split_order.append(np.frombuffer(result.split_order, dtype=">u8")[kept])
        count = len(categories)
        meta.fixed_split.extend(bytes([split_code]) * count)
        meta.file.extend([file_index] * count)
        self.exact.add(exact[kept], rows[kept])
        if near and keys is not None and sigs is not None:
            bulk = kept & ~check
            self.near.store(rows[bulk], sigs[bulk])
            self.near.index(keys[bulk].ravel(), np.repeat(rows[bulk], keys.shape[1]))
            if pending:
                self.near.index(
                    np.fromiter(pending.keys(), dtype=np.uint64, count=len(pending)),
                    np.fromiter(pending.values(), dtype=np.int64, count=len(pending)),
                )
        # The chunk's lines stay in its file until the splits are written.
        self._chunks.append((out_path, result.line_bytes, kept))
        stats["read"] += n + len(result.rejected)
        stats["kept"] += count
        self.timings["dedupe_and_spool"] += time.perf_counter() - started
        if self.progress:
            self.progress(n + len(result.rejected))

    def _process(self, sources: Iterable[SourceFile]) -> None:
        pending: deque[tuple[Future[ChunkResult], SourceFile, dict[str, Any], Path]] = deque()
        for src in sources:
            stats: dict[str, Any] = {"file": src.display_name, "read": 0, "kept": 0}
            if src.trusted_split is None:
                self.inputs.append(stats)
            started = time.perf_counter()
            for each in self._jobs(src, stats):
                self.timings["read"] += time.perf_counter() - started
                out_path = self._chunk_dir / f"{len(self._chunks) + len(pending):07d}.jsonl"
                job = dataclasses.replace(each, out_path=str(out_path))
                if self.executor is None:
                    t0 = time.perf_counter()
                    result = process_chunk(job)
                    self.timings["parse_validate_scrub_sketch"] += time.perf_counter() - t0
                    self._consume(result, src, stats, out_path)
                else:
                    future = self.executor.submit(process_chunk, job)
                    pending.append((future, src, stats, out_path))
                    while len(pending) >= self.max_in_flight:
                        self._drain_one(pending)
                started = time.perf_counter()
            self.timings["read"] += time.perf_counter() - started
        while pending:
            self._drain_one(pending)

    def _drain_one(
        self, pending: deque[tuple[Future[ChunkResult], SourceFile, dict[str, Any], Path]]
    ) -> None:
        future, src, stats, out_path = pending.popleft()
        t0 = time.perf_counter()
        result = future.result()
        self.timings["wait_for_workers"] += time.perf_counter() - t0
        self._consume(result, src, stats, out_path)

    # ---------------------------------------------------------------- splitting

    def _assign_splits(self) -> np.ndarray:
        """1 = train, 2 = validation for every kept record: per category, new records in
        the order of a seeded hash of their id (ties: arrival), the first
        ``validation_fraction`` (rounded) to validation."""
        meta = self.meta
        fixed = np.frombuffer(bytes(meta.fixed_split), dtype=np.uint8)
        assignment = fixed.copy()
        new = np.flatnonzero(fixed == 0)
        if not len(new):
            return assignment
        order = np.concatenate(meta.split_order)[new]
        codes = np.frombuffer(meta.category_codes, dtype=np.uint32)[new]
        # By category, then order, ties by arrival: np.lexsort((order, codes)), which takes
        # 3 ms on the bench corpus (timsort of 64-bit keys) in the tail of the run. Without
        # ties in order (64-bit hashes of distinct ids: the usual case) a quicksort of order
        # and a stable radix sort of the categories give the same ranking in 0.6 ms.
        ranked = np.argsort(order)
        by_order = order[ranked]
        if len(self._category_code) > 1 << 16 or np.any(by_order[1:] == by_order[:-1]):
            ranked = np.lexsort((order, codes))
        else:
            ranked = ranked[np.argsort(codes[ranked].astype(np.uint16), kind="stable")]
        by_code = codes[ranked]
        group = np.flatnonzero(np.r_[True, by_code[1:] != by_code[:-1]])
        sizes = np.diff(np.r_[group, len(ranked)])
        n_val = np.floor(sizes * self.config.validation_fraction + 0.5).astype(np.int64)
        rank = np.arange(len(ranked)) - np.repeat(group, sizes)
        assignment[new[ranked]] = np.where(rank < np.repeat(n_val, sizes), 2, 1)
        return assignment

    # ---------------------------------------------------------------- the run

    def _split_plan(self, assignment: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """Per chunk: its file, its lines' lengths and the split of each (0 = not kept)."""
        plan = []
        base = 0
        for path, sizes, kept in self._chunks:
            count = int(kept.sum())
            split = np.zeros(len(sizes), dtype=np.uint8)
            split[kept] = assignment[base : base + count]
            base += count
            plan.append((str(path), sizes, split))
        self._chunks.clear()
        return plan

    def run(
        self,
        sources: list[SourceFile],
        *,
        workdir: Path,
        previous: list[SourceFile] | None = None,
    ) -> PipelineOutput:
        workdir.mkdir(parents=True, exist_ok=True)
        self._chunk_dir = workdir / "chunks"
        self._chunk_dir.mkdir(exist_ok=True)
        rejects_path = workdir / "rejected.jsonl"
        started = time.perf_counter()
        with rejects_path.open("wb") as rejects:
            self._rejects_file = rejects
            self._process([*(previous or []), *sources])
        meta = self.meta
        t0 = time.perf_counter()
        assignment = self._assign_splits()
        train_path = workdir / "train.jsonl"
        validation_path = workdir / "validation.jsonl"
        # The train file is hashed by one worker and the split files are written (the
        # validation file hashed) by the other, both idle by now, while this process builds
        # the curriculum and the report.
        plan = self._split_plan(assignment)
        jobs: list[Future[str]] = []
        if self.executor is not None:
            jobs.append(self.executor.submit(split_digest, plan, 1))
            jobs.append(
                self.executor.submit(write_splits, plan, train_path, validation_path, digest_of=2)
            )
        train_rows = np.flatnonzero(assignment == 1)
        counts = {1: len(train_rows), 2: len(assignment) - len(train_rows)}
        self.timings["split_and_write"] += time.perf_counter() - t0

        try:
            t0 = time.perf_counter()
            cfg = self.config
            train_ids = _objects(meta.ids)[train_rows].tolist()
            lengths = np.frombuffer(meta.input_chars, dtype=np.uint32).astype(np.int64)
            lengths += np.frombuffer(meta.output_chars, dtype=np.uint32)
            rows = curriculum.manifest_rows(
                train_ids,
                _objects(meta.categories)[train_rows].tolist(),
                lengths[train_rows],
                seed=cfg.curriculum_seed,
                targets=cfg.target_records,
                domain_weights=cfg.domain_weights,
                temperature=cfg.domain_temperature,
                stress_fraction=cfg.stress_fraction,
            )
            manifests = curriculum.manifests_of(train_ids, rows, seed=cfg.curriculum_seed)
            manifest_paths = {}
            for phase, manifest in manifests.items():
                if not manifest["record_ids"]:  # a phase asked for 0 records: no manifest
                    continue
                path = workdir / f"curriculum-{phase}.json"
                path.write_bytes(orjson.dumps(manifest))
                manifest_paths[phase] = path
            self.timings["curriculum"] += time.perf_counter() - t0

            report = self._report(assignment, train_rows, rows, counts)
        except BaseException:
            wait(jobs)  # never leave them writing into a run that is over
            raise
        t0 = time.perf_counter()
        if not jobs:  # in-process: the train file hashed on a thread beside the copying
            with ThreadPoolExecutor(1) as helper:
                hashing = helper.submit(split_digest, plan, 1)
                validation_digest = write_splits(plan, train_path, validation_path, digest_of=2)
                digests = (hashing.result(), validation_digest)
        else:
            digests = (jobs[0].result(), jobs[1].result())
        self._chunk_dir.rmdir()
        self.timings["split_and_write"] += time.perf_counter() - t0
        dataset_id = None
        if meta.ids:
            h = hashlib.sha256(b"tuneloop-dataset-v1\0")
            h.update(self.dataset_name.encode() + b"\0")
            h.update(cfg.digest_input() + b"\0")
            h.update(digests[0].encode() + digests[1].encode())
            dataset_id = f"ds-{h.hexdigest()[:32]}"
        report["dataset_id"] = dataset_id  # the report's second key: it keeps its place
        report["seconds"] = {k: round(v, 4) for k, v in self.timings.items()}
        report["seconds"]["total"] = round(time.perf_counter() - started, 4)
        report_path = workdir / "report.json"
        report_path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
        return PipelineOutput(
            workdir=workdir,
            report=report,
            train_path=train_path,
            validation_path=validation_path,
            report_path=report_path,
            rejects_path=rejects_path,
            manifest_paths=manifest_paths,
            dataset_id=dataset_id,
            train_count=counts[1],
            validation_count=counts[2],
            new_records=meta.fixed_split.count(0),
            counts_by_category=dict(report["counts_by_category"]),
            counts_by_source=dict(report["counts_by_source"]),
        )

    def _report(
        self,
        assignment: np.ndarray,
        train_rows: np.ndarray,
        manifest_rows: dict[str, np.ndarray],
        counts: dict[int, int],
    ) -> dict[str, Any]:
        """The run's report; its ``dataset_id`` is filled in once the split files' digests
        are known. Counts by category are in order of first appearance, as a ``Counter``
        over the records would give them."""
        meta, cfg = self.meta, self.config
        kept = len(meta.ids)
        names = list(self._category_code)  # by code: codes are given in order of appearance
        codes = np.frombuffer(meta.category_codes, dtype=np.uint32).astype(np.int64)
        per_split = np.bincount(codes * 2 + (assignment == 2), minlength=2 * len(names))
        by_cat_split = {
            name: {"train": int(per_split[2 * c]), "validation": int(per_split[2 * c + 1])}
            for c, name in enumerate(names)
        }
        train_codes = codes[train_rows]
        target = cfg.target_count
        output_chars = np.frombuffer(meta.output_chars, dtype=np.uint32)
        train_domains = _counts_by_first_seen(train_codes, names)
        return {
            "dataset_name": self.dataset_name,
            "dataset_id": None,
            "config": cfg.model_dump(mode="json"),
            "inputs": self.inputs,
            "records": {
                "read": sum(s["read"] for s in self.inputs),
                "kept": kept,
                "new": meta.fixed_split.count(0),
                "from_previous_version": kept - meta.fixed_split.count(0),
                "rejected": sum(self.rejected_by_code.values()),
            },
            "rejected_by_reason": dict(self.rejected_by_code),
            "rejected_examples": self.rejected_examples,
            "pii_scrubbed": {t: self.pii.get(t, 0) for t in PII_TYPES},
            "dedupe": {
                "exact": self.rejected_by_code.get("exact_duplicate", 0),
                "near": self.rejected_by_code.get("near_duplicate", 0),
                "near_enabled": cfg.near_dedupe,
                "near_threshold": cfg.near_threshold,
                "lsh_bands": self.rules.bands,
                "lsh_rows": self.rules.rows,
            },
            "counts_by_category": _counts_by_first_seen(codes, names),
            "counts_by_source": dict(Counter(meta.sources)),
            "lengths": {
                "input_chars": _percentiles(meta.input_chars),
                "output_chars": _percentiles(meta.output_chars),
            },
            "outputs": {
                "empty": self.empty_outputs,
                "short": int(np.count_nonzero(output_chars < cfg.short_output_chars)),
                "long": int(np.count_nonzero(output_chars > cfg.long_output_chars)),
                "short_below_chars": cfg.short_output_chars,
                "long_above_chars": cfg.long_output_chars,
            },
            "target": None
            if target is None
            else {
                "count": target,
                "have": kept,
                "gap": max(0, target - kept),
                "progress": f"{kept:,} of {target:,}",
            },
            "split": {
                "train": counts[1],
                "validation": counts[2],
                "validation_fraction": cfg.validation_fraction,
                "seed": cfg.split_seed,
                "by_category": by_cat_split,
            },
            "curriculum": {
                phase: {
                    "records": len(picked),
                    "by_domain": _counts_by_first_seen(train_codes[picked], names),
                }
                for phase, picked in manifest_rows.items()
            }
            | {
                "phase_b_weights": curriculum.phase_b_weights(
                    train_domains, cfg.domain_weights, cfg.domain_temperature
                )
            },
        }
