"""Quantizer: seconds, size and perplexity per target, on the tiny model and SmolLM2-135M.

    .venv/bin/python bench/quantizer.py [--models tiny,smollm2-135m-instruct] [--steps 12]

For each base: train a DoRA adapter for a few real steps on chat records, then run the
quantizer's job (merge → every target → reload → validation perplexity) exactly as the
service does, and print one row per target. Compression is against the merged fp32 model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.quantizer.quantization.pipeline import JobSettings, run_job
from shared.basemodels import resolve_base_model
from tests.integration.quantizer.dora import chat_records, train_dora, write_jsonl

TARGETS = ["bf16-merged", "gptq-w4a16", "awq-w4a16", "gguf-q4_k_m"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2-135m-instruct")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--steps", type=int, default=12, help="DoRA training steps")
    parser.add_argument("--eval-records", type=int, default=32)
    parser.add_argument("--calibration-samples", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128, help="max tokens per sample")
    parser.add_argument("--json", type=Path, help="also write the raw rows here")
    args = parser.parse_args()

    rows = []
    for name in args.models.split(","):
        base = Path(resolve_base_model(name))
        with tempfile.TemporaryDirectory(prefix="bench-quantizer-") as tmp:
            root = Path(tmp)
            t0 = time.perf_counter()
            adapter = train_dora(base, root / "adapter", steps=args.steps)
            train_s = time.perf_counter() - t0
            records = chat_records(args.eval_records + args.calibration_samples, seed=7)
            validation = write_jsonl(root / "validation.jsonl", records)
            settings = JobSettings(
                max_eval_records=args.eval_records,
                max_eval_tokens=args.seq,
                calibration_samples=args.calibration_samples,
                calibration_max_tokens=args.seq,
                generations=2,
                max_new_tokens=16,
            )
            t0 = time.perf_counter()
            report = run_job(
                base_dir=str(base),
                base_model=name,
                adapter_dir=adapter,
                validation=validation,
                targets=args.targets.split(","),
                work_dir=root / "out",
                settings=settings,
                on_progress=lambda m, n=name: print(f"  [{n}] {m}", file=sys.stderr),
            )
            job_s = time.perf_counter() - t0
        print(
            f"{name}: DoRA {args.steps} steps {train_s:.1f}s; merge {report.merge_seconds:.1f}s; "
            f"merged-vs-adapter max |Δlogit| {report.merge_max_logit_diff:.2e}; "
            f"{report.eval_tokens} validation tokens; whole job {job_s:.1f}s",
            file=sys.stderr,
        )
        for t in report.targets:
            rows.append(
                {
                    "model": name,
                    "target": t.format,
                    "status": t.status,
                    "seconds": t.seconds,
                    "size_mb": (t.size_bytes or 0) / 1e6,
                    "compression": report.merged_size_bytes / t.size_bytes
                    if t.size_bytes
                    else None,
                    "ppl_before": t.perplexity_before,
                    "ppl_after": t.perplexity_after,
                    "delta_pct": None if t.relative_increase is None else 100 * t.relative_increase,
                    "reason": t.reason,
                }
            )
    header = (
        f"{'model':<22} {'target':<12} {'status':<9} {'seconds':>8} {'MB':>8} "
        f"{'x fp32':>7} {'ppl before':>11} {'ppl after':>10} {'Δ ppl':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['model']:<22} {r['target']:<12} {r['status']:<9} {r['seconds']:>8.1f} "
            f"{r['size_mb']:>8.2f} {_f(r['compression'], '{:>6.2f}x')} "
            f"{_f(r['ppl_before'], '{:>11.3f}')} {_f(r['ppl_after'], '{:>10.3f}')} "
            f"{_f(r['delta_pct'], '{:>+7.2f}%')}"
        )
    for r in rows:
        if r["reason"]:
            print(f"note: {r['model']} {r['reason']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def _f(value: float | None, fmt: str) -> str:
    return fmt.format(value) if value is not None else "-".rjust(len(fmt.format(0.0)))


if __name__ == "__main__":
    main()
