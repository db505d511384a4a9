"""Trainer benchmark: real peft + trl training steps on this machine, printed as a table.

    .venv/bin/python bench/trainer.py [--steps 8] [--smol] [--smol-steps 3] [--no-qdora]

Measures, on a seed-like length distribution (log-normal answer lengths, long tail):
- tokens/s with sequence packing (best-fit decreasing, padding-free) vs plain padded batches;
- seconds per step of DoRA vs QDoRA (4-bit NF4 base, bitsandbytes CPU backend) vs LoRA;
- with --smol, the same for SmolLM2-135M-Instruct (the cpu-smol demo profile).

Tokens are real (non-padding) tokens, as trl counts them. The first step (warm-up) is
excluded from s/step.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.trainer.training.config import resolve_config
from services.trainer.training.worker import Worker
from shared.basemodels import resolve_base_model

TEXT = (
    "remind me to call mom tomorrow at 9am schedule a meeting with the team next monday book "
    "dentist appointment friday afternoon pay rent on the first review pull request later today "
    "what is a 401k retirement plan ira roth tax deduction estate planning investment portfolio"
)
WORDS = TEXT.split()


def seed_like_records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Chat records whose lengths look like the seeds' corpus: most short, a long tail."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        q_len = max(4, int(rng.lognormvariate(2.5, 0.5)))
        a_len = max(6, min(600, int(rng.lognormvariate(3.6, 0.9))))
        question = " ".join(rng.choice(WORDS) for _ in range(q_len))
        answer = " ".join(rng.choice(WORDS) for _ in range(a_len))
        records.append(
            {
                "id": f"b{i}",
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ],
            }
        )
    return records


class StepTimer:
    """A trainer callback factory: wall time of each optimizer step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def callback(self) -> Any:
        from transformers import TrainerCallback

        timer = self

        class Cb(TrainerCallback):  # type: ignore[misc]
            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
                timer._t = time.perf_counter()
                return control

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
                timer.times.append(time.perf_counter() - timer._t)
                return control

        return Cb()


def run_case(
    base_model: str,
    profile: str,
    steps: int,
    records: list[dict[str, Any]],
    threads: int,
    **overrides: Any,
) -> dict[str, Any]:
    import trl

    config = resolve_config(profile, overrides={"max_steps_per_phase": steps, **overrides})
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        work = Path(tmp)
        data = work / "train.jsonl"
        data.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in records))
        spec = {
            "work_dir": str(work),
            "base_model_path": resolve_base_model(base_model),
            "config": config.model_dump(mode="json"),
            "phases": [{"name": "all", "file": str(data)}],
            "checkpoint_every_steps": 10**6,
            "threads": threads,
            "prompts": [],
        }
        timer = StepTimer()
        original = trl.SFTTrainer.__init__

        def patched(self: Any, *args: Any, **kwargs: Any) -> None:
            kwargs["callbacks"] = [*kwargs.get("callbacks", []), timer.callback()]
            original(self, *args, **kwargs)

        trl.SFTTrainer.__init__ = patched  # type: ignore[method-assign]
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the worker's progress lines
                meta = Worker(spec).run()
        finally:
            trl.SFTTrainer.__init__ = original  # type: ignore[method-assign]
    phase = meta["phases"][0]
    steady = timer.times[1:] or timer.times
    return {
        "tokens": phase["tokens"],
        # Real tokens over time spent in optimizer steps (not model loading or saving).
        "tokens_per_s": phase["tokens"] / sum(timer.times),
        "s_per_step": sum(steady) / len(steady),
        "final_loss": phase["final_loss"],
        "peak_mb": phase["peak_memory_mb"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--smol", action="store_true", help="also measure SmolLM2-135M")
    parser.add_argument("--smol-steps", type=int, default=3)
    parser.add_argument("--no-qdora", action="store_true")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 is stable on a shared machine; OpenMP threads spin under load)",
    )
    args = parser.parse_args()
    records = seed_like_records(args.records)

    cases: list[tuple[str, str, str, int, dict[str, Any]]] = [
        ("tiny", "cpu-tiny", "dora, padded", args.steps, {"packing": False}),
        ("tiny", "cpu-tiny", "dora, packed", args.steps, {"packing": True}),
        ("tiny", "cpu-tiny", "lora, padded", args.steps, {"packing": False, "method": "lora"}),
    ]
    if not args.no_qdora:
        cases.append(
            ("tiny", "cpu-tiny", "qdora, padded", args.steps, {"packing": False, "method": "qdora"})
        )
    if args.smol:
        for label, extra in (
            ("dora, padded", {"packing": False}),
            ("dora, packed", {"packing": True}),
            ("lora, padded", {"packing": False, "method": "lora"}),
        ):
            cases.append(("smollm2-135m-instruct", "cpu-smol", label, args.smol_steps, extra))
        if not args.no_qdora:
            cases.append(
                (
                    "smollm2-135m-instruct",
                    "cpu-smol",
                    "qdora, padded",
                    args.smol_steps,
                    {"packing": False, "method": "qdora"},
                )
            )

    rows = []
    for base, profile, label, steps, extra in cases:
        print(f"... {base} {label} ({steps} steps)", file=sys.stderr, flush=True)
        try:
            result = run_case(base, profile, steps, records, args.threads, **extra)
        except Exception as exc:  # a case that cannot run here is reported, not hidden
            rows.append((base, label, steps, None, repr(exc)[:80]))
            continue
        rows.append((base, label, steps, result, ""))

    print()
    header = f"{'model':<22} {'case':<15} {'steps':>5} {'tokens/s':>10} {'s/step':>8} " + (
        f"{'loss':>7} {'peak MB':>8}"
    )
    print(header)
    print("-" * len(header))
    by_key: dict[tuple[str, str], dict[str, Any]] = {}
    for base, label, steps, result, error in rows:
        if result is None:
            print(f"{base:<22} {label:<15} {steps:>5}  failed: {error}")
            continue
        by_key[(base, label)] = result
        print(
            f"{base:<22} {label:<15} {steps:>5} {result['tokens_per_s']:>10.0f} "
            f"{result['s_per_step']:>8.3f} {result['final_loss']:>7.3f} {result['peak_mb']:>8.0f}"
        )
    print()
    for base in dict.fromkeys(b for b, *_ in rows):
        padded, packed = by_key.get((base, "dora, padded")), by_key.get((base, "dora, packed"))
        lora, qdora = by_key.get((base, "lora, padded")), by_key.get((base, "qdora, padded"))
        if padded and packed:
            print(
                f"{base}: packing/padding-free vs padded tokens/s = "
                f"{packed['tokens_per_s'] / padded['tokens_per_s']:.2f}x"
            )
        if padded and lora:
            print(
                f"{base}: DoRA/LoRA step-time ratio = "
                f"{padded['s_per_step'] / lora['s_per_step']:.2f}"
            )
        if padded and qdora:
            print(
                f"{base}: QDoRA/DoRA step-time ratio = "
                f"{qdora['s_per_step'] / padded['s_per_step']:.2f}"
            )
    if not math.isfinite(sum(r[3]["tokens_per_s"] for r in rows if r[3])):
        sys.exit(1)


if __name__ == "__main__":
    main()
