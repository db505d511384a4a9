"""One quantization job: adapter + base → merged model → every requested target, gated.

The merged full-precision model's validation perplexity is the reference ("before"); each
target's artifact is reloaded the way a server would load it and scored on the same token ids
("after"). A target whose relative increase exceeds the threshold is rejected; the others
still pass. Every number lands in ``quantization_report.json`` beside each artifact.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from services.quantizer.quantization.data import DatasetError, read_chat_jsonl
from services.quantizer.quantization.merge import (
    AdapterError,
    AdapterInfo,
    copy_tokenizer,
    dir_size,
    inspect_adapter,
    load_adapted,
    merge_adapter,
)
from services.quantizer.quantization.perplexity import (
    EvalSet,
    LlamaCppScorer,
    Quality,
    TransformersScorer,
    build_eval_set,
    measure,
)

log = logging.getLogger(__name__)

TARGETS = ("bf16-merged", "awq-w4a16", "gptq-w4a16", "gguf-q4_k_m", "adapter")
REPORT_NAME = "quantization_report.json"
Status = Literal["accepted", "rejected", "failed"]


class JobError(Exception):
    """The whole job cannot run (bad adapter, unusable validation split, unfaithful merge)."""

    def __init__(self, reason: str, *, retryable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable

    def __reduce__(self) -> tuple[Any, ...]:  # crosses the process boundary intact
        return (_job_error, (self.reason, self.retryable))


def _job_error(reason: str, retryable: bool) -> JobError:
    return JobError(reason, retryable=retryable)


@dataclass(frozen=True)
class JobSettings:
    save_dtype: str = "float32"
    max_ppl_increase: float = 0.05
    max_eval_records: int = 64
    max_eval_tokens: int = 256
    calibration_samples: int = 16
    calibration_max_tokens: int = 256
    group_size: int = 128
    generations: int = 3
    max_new_tokens: int = 24
    verify_merge: bool = True
    merge_tolerance: float = 1e-3
    max_validation_bytes: int = 64 * 1024 * 1024
    gguf_threads: int = 2


@dataclass
class TargetResult:
    format: str
    status: Status
    seconds: float
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    relative_increase: float | None = None
    size_bytes: int | None = None
    reason: str | None = None
    generations: list[str] = field(default_factory=list)
    output_dir: Path | None = None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("output_dir")
        return {k: _json_float(v) for k, v in out.items()}


@dataclass
class JobReport:
    adapter: AdapterInfo
    base_model: str
    merged_perplexity: float
    merged_size_bytes: int
    merge_seconds: float
    merge_max_logit_diff: float | None
    eval_tokens: int
    eval_records: int
    skipped_records: int
    calibration_records: int
    prompts: list[str]
    merged_generations: list[str]
    targets: list[TargetResult]
    threshold: float

    def as_dict(self) -> dict[str, Any]:
        ts = self.targets
        return {
            "adapter": asdict(self.adapter),
            "base_model": self.base_model,
            "threshold_relative_increase": self.threshold,
            "merged": {
                "perplexity": _json_float(self.merged_perplexity),
                "size_bytes": self.merged_size_bytes,
                "merge_seconds": self.merge_seconds,
                "max_logit_diff_vs_adapter": self.merge_max_logit_diff,
            },
            "validation": {
                "records": self.eval_records,
                "tokens": self.eval_tokens,
                "skipped_lines": self.skipped_records,
                "calibration_records": self.calibration_records,
            },
            "generations": [
                {"prompt": p, "merged": m, **{t.format: _at(t.generations, i) for t in ts}}
                for i, (p, m) in enumerate(zip(self.prompts, self.merged_generations, strict=False))
            ],
            "targets": [t.as_dict() for t in self.targets],
        }


def _at(items: list[str], i: int) -> str | None:
    return items[i] if i < len(items) else None


def _json_float(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else "inf"
    return v


def relative_increase(before: float, after: float) -> float:
    if not math.isfinite(after):
        return math.inf
    return (after - before) / before if before > 0 else math.inf


def gate(before: float, after: float, threshold: float) -> tuple[bool, float]:
    rel = relative_increase(before, after)
    return rel <= threshold, rel


def _free() -> None:
    gc.collect()


def _merge_check(base_dir: str, adapter_dir: Path, merged: Any, sequence: list[int]) -> float:
    """Largest absolute logit difference between adapter-on-base and the merged model."""
    import torch

    adapted = load_adapted(base_dir, adapter_dir)
    ids = torch.tensor([sequence])
    with torch.no_grad():
        diff = (adapted(ids).logits - merged(ids).logits.float()).abs().max()
    del adapted
    return float(diff)


def run_job(
    *,
    base_dir: str,
    base_model: str,
    adapter_dir: Path,
    validation: Path,
    targets: Sequence[str],
    work_dir: Path,
    settings: JobSettings,
    on_progress: Callable[[str], None] | None = None,
    damage: Callable[[str, Path], None] | None = None,
) -> JobReport:
    """Run the job; each target's artifact directory is left under ``work_dir/<format>``.

    ``damage`` (tests and benchmarks only) may corrupt a target's artifact before it is
    scored, to show that the gate rejects it.
    """
    from transformers import AutoTokenizer

    progress = on_progress or (lambda _msg: None)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise JobError(f"unknown target(s) {unknown}; choose from {list(TARGETS)}")
    try:
        info = inspect_adapter(adapter_dir)
    except AdapterError as exc:
        raise JobError(str(exc)) from exc

    work_dir.mkdir(parents=True, exist_ok=True)
    merged_dir = work_dir / "bf16-merged"
    shutil.rmtree(merged_dir, ignore_errors=True)
    progress("merging")
    started = time.perf_counter()
    try:
        merge_adapter(base_dir, adapter_dir, merged_dir, save_dtype=settings.save_dtype)
    except (RuntimeError, ValueError, OSError, KeyError) as exc:
        # peft/transformers say "size mismatch", "Target modules not found"...: this adapter
        # does not fit this base, and retrying will not make it.
        raise JobError(f"merging the adapter into {base_model} failed: {exc}") from exc
    merge_seconds = time.perf_counter() - started

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    try:
        records = read_chat_jsonl(
            validation,
            max_records=settings.max_eval_records + settings.calibration_samples,
            max_bytes=settings.max_validation_bytes,
        )
    except DatasetError as exc:
        raise JobError(str(exc)) from exc
    eval_records = type(records)(records.conversations[: settings.max_eval_records])
    evalset = build_eval_set(
        tokenizer,
        eval_records,
        max_tokens=settings.max_eval_tokens,
        generations=settings.generations,
    )
    if not evalset.sequences:
        raise JobError("validation split has no record of at least 2 tokens")
    # Calibrate on records the gate does not score when there are enough of them.
    rest = records.conversations[settings.max_eval_records :]
    cal_source = rest if len(rest) >= settings.calibration_samples else records.conversations
    calibration = build_eval_set(
        tokenizer,
        type(records)(cal_source[: settings.calibration_samples]),
        max_tokens=settings.calibration_max_tokens,
        generations=0,
    ).sequences

    progress("scoring the merged model")
    merged_scorer = TransformersScorer.load(merged_dir)
    merged_quality = measure(
        merged_scorer, evalset, tokenizer, max_new_tokens=settings.max_new_tokens
    )
    diff: float | None = None
    if settings.verify_merge:
        diff = _merge_check(base_dir, adapter_dir, merged_scorer.model, evalset.sequences[0])
        if diff > settings.merge_tolerance:
            raise JobError(
                f"merged model differs from adapter-on-base by {diff:.3g} in the logits "
                f"(tolerance {settings.merge_tolerance})"
            )
    del merged_scorer
    _free()

    results = []
    for target in targets:
        progress(f"target {target}")
        result = _run_target(
            target,
            info=info,
            adapter_dir=adapter_dir,
            merged_dir=merged_dir,
            work_dir=work_dir,
            evalset=evalset,
            calibration=calibration,
            tokenizer=tokenizer,
            before=merged_quality,
            settings=settings,
            damage=damage,
        )
        results.append(result)
        _free()

    report = JobReport(
        adapter=info,
        base_model=base_model,
        merged_perplexity=merged_quality.perplexity,
        merged_size_bytes=dir_size(merged_dir),
        merge_seconds=merge_seconds,
        merge_max_logit_diff=diff,
        eval_tokens=evalset.tokens,
        eval_records=len(evalset.sequences),
        skipped_records=records.skipped,
        calibration_records=len(calibration),
        prompts=evalset.prompt_texts,
        merged_generations=merged_quality.generations,
        targets=results,
        threshold=settings.max_ppl_increase,
    )
    text = json.dumps(report.as_dict(), indent=1, sort_keys=True)
    for result in results:
        if result.output_dir is not None:
            (result.output_dir / REPORT_NAME).write_text(text)
            result.size_bytes = dir_size(result.output_dir)
    return report


def _run_target(
    target: str,
    *,
    info: AdapterInfo,
    adapter_dir: Path,
    merged_dir: Path,
    work_dir: Path,
    evalset: EvalSet,
    calibration: list[list[int]],
    tokenizer: Any,
    before: Quality,
    settings: JobSettings,
    damage: Callable[[str, Path], None] | None,
) -> TargetResult:
    started = time.perf_counter()

    def failed(reason: str) -> TargetResult:
        return TargetResult(
            format=target,
            status="failed",
            seconds=time.perf_counter() - started,
            perplexity_before=before.perplexity,
            reason=reason,
        )

    out_dir = work_dir / target
    try:
        quality, out_dir = _produce(
            target,
            info=info,
            adapter_dir=adapter_dir,
            merged_dir=merged_dir,
            out_dir=out_dir,
            evalset=evalset,
            calibration=calibration,
            tokenizer=tokenizer,
            before=before,
            settings=settings,
            damage=damage,
        )
    except (JobError, ValueError, RuntimeError, OSError) as exc:
        log.warning("target %s failed: %s", target, exc)
        return failed(f"{target}: {exc}")
    ok, rel = gate(before.perplexity, quality.perplexity, settings.max_ppl_increase)
    reason = None
    if not ok:
        reason = (
            f"{target}: validation perplexity rose from {before.perplexity:.4f} to "
            f"{quality.perplexity:.4f} ({rel:+.2%}), over the {settings.max_ppl_increase:.2%} "
            "limit"
        )
    return TargetResult(
        format=target,
        status="accepted" if ok else "rejected",
        seconds=time.perf_counter() - started,
        perplexity_before=before.perplexity,
        perplexity_after=quality.perplexity,
        relative_increase=rel,
        size_bytes=dir_size(out_dir),
        reason=reason,
        generations=quality.generations,
        output_dir=out_dir,
    )


def _produce(
    target: str,
    *,
    info: AdapterInfo,
    adapter_dir: Path,
    merged_dir: Path,
    out_dir: Path,
    evalset: EvalSet,
    calibration: list[list[int]],
    tokenizer: Any,
    before: Quality,
    settings: JobSettings,
    damage: Callable[[str, Path], None] | None,
) -> tuple[Quality, Path]:
    """Build one target's artifact and score it as its server would load it."""
    from services.quantizer.quantization import compress
    from services.quantizer.quantization import gguf as gguf_convert

    def score_hf(path: Path) -> Quality:
        scorer = TransformersScorer.load(path)
        try:
            return measure(scorer, evalset, tokenizer, max_new_tokens=settings.max_new_tokens)
        finally:
            del scorer

    if target == "adapter":
        if info.use_dora:
            raise JobError(
                "a DoRA adapter cannot be served unmerged (vLLM does not support DoRA); "
                "use bf16-merged or a quantized target"
            )
        shutil.rmtree(out_dir, ignore_errors=True)
        shutil.copytree(adapter_dir, out_dir)
        if damage:
            damage(target, out_dir)
            raise JobError("an unmerged adapter cannot be damaged and rescored here")
        return before, out_dir  # adapter-on-base is what the merged model computes
    if target == "bf16-merged":
        if damage:
            shutil.rmtree(out_dir, ignore_errors=True)
            shutil.copytree(merged_dir, out_dir)
            damage(target, out_dir)
            return score_hf(out_dir), out_dir
        if settings.save_dtype == "float32":
            return before, merged_dir  # the reference itself: nothing was lost
        return score_hf(merged_dir), merged_dir
    if target in ("awq-w4a16", "gptq-w4a16"):
        shutil.rmtree(out_dir, ignore_errors=True)
        compress.quantize_w4a16(
            merged_dir,
            out_dir,
            method="awq" if target == "awq-w4a16" else "gptq",
            calibration=calibration,
            group_size=settings.group_size,
            max_seq_length=settings.calibration_max_tokens,
        )
        if damage:
            damage(target, out_dir)
        return score_hf(out_dir), out_dir
    if target == "gguf-q4_k_m":
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        f32 = out_dir.parent / "gguf-f32.gguf"
        final = out_dir / "model.Q4_K_M.gguf"
        try:
            gguf_convert.convert_to_gguf(merged_dir, f32)
            gguf_convert.quantize_gguf(f32, final, threads=settings.gguf_threads)
        finally:
            f32.unlink(missing_ok=True)
        # llama.cpp needs only the .gguf; the HF config and tokenizer ride along for reference.
        shutil.copy2(merged_dir / "config.json", out_dir / "config.json")
        copy_tokenizer(merged_dir, out_dir)
        if damage:
            damage(target, out_dir)
        n_ctx = max(len(s) for s in [*evalset.sequences, *evalset.prompts]) + 64
        cpp = LlamaCppScorer(final, n_ctx=n_ctx + settings.max_new_tokens)
        try:
            return (
                measure(cpp, evalset, tokenizer, max_new_tokens=settings.max_new_tokens),
                out_dir,
            )
        finally:
            cpp.close()
    raise JobError(f"unknown target {target!r}")
