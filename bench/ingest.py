"""Ingest benchmark: a seed-scale corpus (four files, 40,993 pairs plus 5% duplicates, some
PII and broken lines) through the full pipeline (parse → validate → scrub → dedupe → split →
write), with near-duplicate detection on and off; then where the time goes, per stage.

    .venv/bin/python bench/ingest.py [--workers N] [--scale 1.0] [--path fast|python|both]

``--path``: the compiled fast path (services/ingest/_fastpass.c, the default when built), the
Python path only (INGEST_FAST_PATH=0), or both, one after the other.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import multiprocessing
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

from services.ingest.pipeline import chunks, dedupe, fastpass, formats, validate
from services.ingest.pipeline.formats import SourceFile
from services.ingest.pipeline.pii import PiiScrubber
from services.ingest.pipeline.run import CHUNK_RECORDS, Pipeline, rules_for
from services.ingest.settings import ProcessingConfig
from shared.procs import steady_heap

SEED_FILES = (
    ("risk", 23_493, "alpaca", "jsonl"),
    ("compliance", 10_000, "openai", "jsonl.gz"),
    ("markets", 5_000, "sharegpt", "json"),
    ("support", 2_500, "alpaca", "json"),
)
WORDS = [
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "for",
    "is",
    "on",
    "that",
    "by",
    "this",
    "with",
    "from",
    "as",
    "at",
    "be",
    "are",
    "or",
    "an",
    "it",
    "not",
    "which",
    "risk",
    "credit",
    "market",
    "loan",
    "rate",
    "bank",
    "capital",
    "liquidity",
    "exposure",
    "portfolio",
    "asset",
    "fund",
    "interest",
    "default",
    "ratio",
    "regulatory",
    "compliance",
    "report",
    "quarter",
    "revenue",
    "margin",
    "cash",
    "flow",
    "hedge",
    "derivative",
    "swap",
    "option",
    "bond",
    "yield",
    "equity",
    "volatility",
    "model",
    "stress",
    "scenario",
    "customer",
    "account",
    "payment",
    "transfer",
    "policy",
    "control",
    "audit",
    "review",
    "analysis",
    "forecast",
    "increase",
    "decrease",
    "growth",
    "decline",
    "higher",
    "lower",
    "total",
    "net",
    "gross",
    "annual",
    "monthly",
    "current",
]


def _text(rng: random.Random, lo: int, hi: int) -> str:
    target = rng.randint(lo, hi)
    words: list[str] = []
    size = 0
    while size < target:
        w = rng.choice(WORDS)
        if rng.random() < 0.08:
            w = f"{w}{rng.randint(1, 999)}"
        words.append(w)
        size += len(w) + 1
    return " ".join(words).capitalize() + "."


PII_SNIPPETS = (
    "jane.doe@example.com",
    "(555) 123-4567",
    "123-45-6789",
    "4111 1111 1111 1111",
    "GB82 WEST 1234 5698 7654 32",
    "10.20.30.40",
)


def make_corpus(root: Path, scale: float = 1.0, seed: int = 7) -> tuple[list[SourceFile], int]:
    rng = random.Random(seed)
    sources = []
    total = 0
    for domain, count, fmt, ext in SEED_FILES:
        count = int(count * scale)
        records: list[bytes] = []
        for _ in range(count):
            prompt = _text(rng, 60, 900)
            answer = _text(rng, 120, 1600)
            if rng.random() < 0.05:
                answer += f" Contact {rng.choice(PII_SNIPPETS)} for details."
            if fmt == "alpaca":
                rec = {"instruction": prompt, "input": "", "output": answer}
            elif fmt == "openai":
                rec = {
                    "messages": [
                        {"role": "system", "content": "You are a risk analyst."},
                        {"role": "user", "content": prompt},
                        {"role": "assistant", "content": answer},
                    ]
                }
            else:
                rec = {
                    "conversations": [
                        {"from": "human", "value": prompt},
                        {"from": "gpt", "value": answer},
                    ]
                }
            records.append(orjson.dumps(rec))
        # 5% duplicates: half exact copies, half with one word changed.
        for _ in range(count // 20):
            original = orjson.loads(rng.choice(records))
            if rng.random() < 0.5:
                blob = orjson.dumps(original).replace(b" the ", b" a ", 1)
                records.append(blob)
            else:
                records.append(orjson.dumps(original))
        rng.shuffle(records)
        total += len(records)
        path = root / f"{domain}.{ext}"
        if ext == "json":
            path.write_bytes(b"[" + b",\n".join(records) + b"]")
        else:
            lines = list(records)
            for _ in range(max(1, count // 500)):  # broken lines
                lines.insert(rng.randrange(len(lines)), b'{"instruction": "cut off')
            data = b"\n".join(lines) + b"\n"
            path.write_bytes(gzip.compress(data, 1) if ext.endswith(".gz") else data)
        sources.append(SourceFile(path, path.name, "auto", domain=domain))
    return sources, total


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def run_once(
    sources: list[SourceFile], config: ProcessingConfig, executor, workers: int, fast: bool
):
    """Wall seconds, and CPU seconds of the main process and of the workers (the CPU time
    does not depend on how loaded the machine is)."""
    worker_pids = list(executor._processes) if executor else []
    with tempfile.TemporaryDirectory() as tmp:
        pipe = Pipeline(
            config, dataset_name="bench", executor=executor, max_in_flight=2 * workers + 1
        )
        pipe.rules = dataclasses.replace(pipe.rules, fast_path=fast)
        main0, work0 = time.process_time(), _cpu_seconds(worker_pids)
        t0 = time.perf_counter()
        out = pipe.run(sources, workdir=Path(tmp))
        wall = time.perf_counter() - t0
        main_cpu = time.process_time() - main0
        worker_cpu = _cpu_seconds(worker_pids) - work0
        return wall, main_cpu, worker_cpu, out


def stage_costs(sources: list[SourceFile], config: ProcessingConfig) -> list[tuple[str, float]]:
    """Single-core cost of each stage over the same records, chunk by chunk as the
    pipeline's workers do it, in records/s."""
    items = []
    for src in sources:
        items += [raw for _, raw in formats.iter_items(src.path)]
    n = len(items)
    cost: dict[str, float] = {}

    def timed(name: str, fn):
        t = time.perf_counter()
        out = fn()
        cost[name] = cost.get(name, 0.0) + time.perf_counter() - t
        return out

    rules = rules_for(config)
    index = dedupe.NearDuplicateIndex(threshold=config.near_threshold, num_perm=config.num_perm)
    for lo in range(0, n, CHUNK_RECORDS):
        chunk = items[lo : lo + CHUNK_RECORDS]

        def parse(chunk=chunk):
            out = []
            for raw in chunk:
                with contextlib.suppress(formats.RecordError):
                    out.append(formats.parse_line(raw))
            return out

        parsed = timed("parse (orjson, ijson for arrays)", parse)
        convs = timed(
            "normalise to chat form",
            lambda parsed=parsed: [
                formats.normalise(r, f) for r in parsed if (f := formats.detect_format(r))
            ],
        )

        def check(convs=convs):
            for m in convs:
                with contextlib.suppress(chunks.Rejected):
                    chunks._check(m, rules)
            validate.error_texts(
                [t["content"] for m in convs for t in m if t["role"] == "assistant"]
            )

        timed("validate (RE2 error text)", check)

        def scrub(convs=convs):
            flat = PiiScrubber().scrub_many([t["content"] for m in convs for t in m])
            it = iter(flat)
            for m in convs:
                for t in m:
                    t["content"] = next(it)

        timed("PII scrub (RE2 over the chunk)", scrub)
        texts = timed(
            "lowercase + exact key (xxh3)",
            lambda convs=convs: [
                (x := dedupe.conversation_text(m), dedupe.exact_key(x))[0] for m in convs
            ],
        )
        timed(
            "serialise (orjson)",
            lambda convs=convs: [
                orjson.dumps({"id": "r", "messages": m, "category": "x", "source": "y"})
                for m in convs
            ],
        )
        sigs = timed(
            "MinHash (numpy shingles + OPH)",
            lambda texts=texts: dedupe.signatures(texts, num_perm=config.num_perm),
        )

        def lsh(sigs=sigs, lo=lo):
            keys = index.keys(sigs)
            found, check = index.check_chunk(keys)
            rows = np.arange(lo, lo + len(sigs))
            for i in np.flatnonzero(check).tolist():
                index.similar({c for c in found[i].tolist() if c >= 0}, sigs[i])
            index.store(rows, sigs)
            fresh = ~check
            index.index(keys[fresh].ravel(), np.repeat(rows[fresh], keys.shape[1]))

        timed("LSH bands + lookups", lsh)
    # The C pass alone, step by step (each line adds to the one before; lines it leaves to
    # Python are counted, not done).
    if fastpass.native is not None:
        blocks = [
            b"\n".join(raw.rstrip(b"\n") for raw in items[lo : lo + CHUNK_RECORDS])
            for lo in range(0, n, CHUNK_RECORDS)
        ]
        sketch = fastpass.sketch_args(config.num_perm)
        steps = (
            ("C: parse, chat form, checks, key, line", (0, 0), (0, 0, b"")),
            ("C: + PII and error prefilters", (1, 1), (0, 0, b"")),
            ("C: + MinHash", (1, 1), sketch),
        )
        for name, (check_error, check_pii), minhash in steps:
            for block in blocks:
                args = (block, 0, 0, 50, 30_000, 100, 30_000, 256, check_error, check_pii)
                args += (42, formats.MAX_RECORD_BYTES, "c", "s", b'"c"', b'"s"', *minhash)
                timed(name, lambda args=args: fastpass.native.process(*args))
    # The whole per-record work of a chunk (what a worker does), both ways.
    for fast in (False, True):
        name = f"all of it per chunk, {'fast path (C)' if fast else 'Python path'}"
        for lo in range(0, n, CHUNK_RECORDS):
            lines = [raw.rstrip(b"\n") for raw in items[lo : lo + CHUNK_RECORDS]]
            job = chunks.ChunkJob(
                items=[],
                block=b"\n".join(lines) + b"\n",
                first_line=1,
                format=None,
                domain="bench",
                source="bench",
                trusted=False,
                rules=dataclasses.replace(rules, fast_path=fast),
            )
            timed(name, lambda job=job: chunks.process_chunk(job))
    return [(name, n / secs if secs else float("inf")) for name, secs in cost.items()]


def _child_run(paths: list[str], conn) -> None:
    srcs = [SourceFile(Path(p), Path(p).name) for p in paths]
    steady_heap()  # as the service's process has it (make_executor)
    with tempfile.TemporaryDirectory() as tmp:
        Pipeline(ProcessingConfig(), dataset_name="mem").run(srcs, workdir=Path(tmp))
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec (it would be the parent's).
    status = Path("/proc/self/status").read_text()
    hwm_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    conn.send(hwm_kb / 1024)


def peak_rss_of_run(sources: list[SourceFile]) -> float:
    """Peak RSS (MB) of a fresh process that runs the pipeline in-process on ``sources``."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child_run, args=([str(s.path) for s in sources], child))
    proc.start()
    peak = parent.recv()
    proc.join()
    return float(peak)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--path", choices=("fast", "python", "both"), default="both")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sources, total = make_corpus(Path(tmp), args.scale)
        size = sum(s.path.stat().st_size for s in sources)
        print(
            f"corpus: {total:,} records in {len(sources)} files, {size / 1e6:.1f} MB "
            f"(cpus: {os.cpu_count()}, load: {os.getloadavg()[0]:.1f})"
        )
        # The service's own pool (forkserver workers, steady heap), started and warmed by
        # the service's own code: not timed, as a running service has it ready. (Imported
        # here: the memory probe's fresh interpreter should not load the web app.)
        from services.ingest.app import make_executor
        from services.ingest.settings import IngestSettings

        executor = make_executor(IngestSettings(workers=args.workers))
        print(
            f"\n{'mode':<28}{'workers':>8}{'best s':>9}{'records/s':>12}{'kept':>8}"
            f"{'exact':>7}{'near':>6}"
        )
        paths = {"fast": [True], "python": [False], "both": [True, False]}[args.path]
        if True in paths and not fastpass.wanted():
            raise SystemExit("the fast path is not built (pip install -e .) or INGEST_FAST_PATH=0")
        ids: dict[tuple[bool, bool], str | None] = {}
        for near in (True, False):
            for fast in paths:
                config = ProcessingConfig(near_dedupe=near)
                runs = [
                    run_once(sources, config, executor, args.workers, fast)
                    for _ in range(args.repeat)
                ]
                wall, _, _, out = min(runs, key=lambda r: r[0])
                ids[near, fast] = out.dataset_id
                # CPU time from the run that used least of it: on a shared machine, contention
                # (caches, SMT siblings) inflates CPU time too, if less than wall time.
                _, main_cpu, worker_cpu, _ = min(runs, key=lambda r: r[1] + r[2])
                d = out.report["dedupe"]
                # On idle cores a run needs at least its CPU time spread over the cores, and
                # at least the main process's own (reading and deciding are sequential).
                cores = os.cpu_count() or 1
                idle = max(main_cpu, (main_cpu + worker_cpu) / cores) if executor else main_cpu
                mode = f"near-dedupe {'on' if near else 'off'}, {'fast' if fast else 'python'}"
                print(
                    f"{mode:<28}{args.workers:>8}{wall:>9.3f}{total / wall:>12,.0f}"
                    f"{out.kept:>8}{d['exact']:>7}{d['near']:>6}"
                )
                print(
                    f"    CPU: main {main_cpu:.2f} s, workers {worker_cpu:.2f} s "
                    f"= {1e6 * (main_cpu + worker_cpu) / total:.1f} µs per record "
                    f"({1e6 * main_cpu / total:.1f} main + {1e6 * worker_cpu / total:.1f} "
                    f"workers) → {total / (main_cpu + worker_cpu):,.0f} records per CPU-second; "
                    f"on {cores} idle cores ≈ {total / idle:,.0f} records/s "
                    f"(load {os.getloadavg()[0]:.1f})"
                )
                # Issue 3's targets, in wall time: how often a run met it says more than the
                # best run alone on a shared machine.
                target = 50_000 if near else 200_000
                walls = sorted(r[0] for r in runs)
                met = sum(total / w >= target for w in walls)
                print(
                    f"    wall of the {len(walls)} runs: best {walls[0]:.3f} s, median "
                    f"{walls[len(walls) // 2]:.3f} s; {met} of {len(walls)} at ≥ {target:,} "
                    "records/s"
                )
                print(
                    "    main process (wall s): "
                    + ", ".join(f"{k}={v}" for k, v in out.report["seconds"].items())
                )
            if len(paths) == 2:
                same = ids[near, True] == ids[near, False]
                print(f"    same dataset id both ways: {same}")
        if executor:
            executor.shutdown()
        small_dir = Path(tmp) / "small"
        small_dir.mkdir()
        small, small_total = make_corpus(small_dir, 0.5 * args.scale, seed=8)
        rss_small = peak_rss_of_run(small)
        rss_full = peak_rss_of_run(sources)
        per_record = (rss_full - rss_small) * 1024 * 1024 / max(1, total - small_total)
        print(
            f"\nmemory (one process, fresh interpreter): peak RSS {rss_small:.0f} MB for "
            f"{small_total:,} records, {rss_full:.0f} MB for {total:,} records "
            f"({size / 1e6:.0f} MB of input): ~{per_record:.0f} bytes per record; "
            "record content stays on disk (chunk files)"
        )
        print("\nsingle-core cost per stage (records/s, µs per record):")
        for name, rate in stage_costs(sources, ProcessingConfig()):
            print(f"  {name:<32}{rate:>12,.0f}{1e6 / rate:>8.2f}")


if __name__ == "__main__":
    main()
