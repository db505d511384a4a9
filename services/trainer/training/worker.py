"""The training worker: runs in a process of its own (``python -m
services.trainer.training.worker SPEC.json``) so the service's event loop stays free to
heartbeat, an out-of-memory kill takes only the worker, and a cancellation can stop it.

It trains each curriculum phase in order with trl's ``SFTTrainer`` (phase B continues from A's
adapter, C from B's), checkpoints every N steps or seconds, and resumes from the newest
complete checkpoint in its work directory. Progress goes to stdout as ``@@tuneloop {json}``
lines (steps, checkpoints, phases); the outcome goes to ``result.json``.

Work directory layout::

    spec.json  state.json  steps.jsonl  result.json  STOP (cancellation request)
    phases/<P>/checkpoints/checkpoint-<step>/   phases/<P>/adapter/
    adapter/   (the final adapter: PEFT files, tokenizer, training_metadata.json, loss_curve.json)
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from services.trainer.training.config import TrainingConfig

PROGRESS_PREFIX = "@@tuneloop "
EXIT_OK = 0
EXIT_PERMANENT = 3
EXIT_CANCELLED = 4
STOP_FILE = "STOP"
CHECKPOINT_MARKER = "trainer_state.json"

# The seeds' post-training protocol: answer a few domain prompts and record latency/length.
DEFAULT_PROMPTS = [
    "remind me to call mom tomorrow at 9am",
    "schedule a meeting with the team next monday",
    "what is a 401k retirement plan?",
    "book dentist appointment friday afternoon",
    "pay rent on the first",
]


class PermanentFailure(Exception):
    """Training cannot succeed by retrying (diverged, out of memory, unsupported device)."""

    def __init__(self, reason: str, *, kind: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.kind = kind
        self.detail = detail or {}


def non_finite(logs: dict[str, Any]) -> str | None:
    """The first of loss / grad norm in a log row that is NaN or infinite, as ``"loss nan"``."""
    for key in ("loss", "grad_norm"):
        value = logs.get(key)
        if value is not None and not math.isfinite(float(value)):
            return f"{key.replace('_', ' ')} {float(value)}"
    return None


def chatml_training_template(original: str) -> str:
    """The project's ChatML template (with generation markers), plus the default system
    prompt ``original`` inserts when a conversation has none (as SmolLM2's does)."""
    from shared.testmodels import CHAT_TEMPLATE

    found = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", original, re.DOTALL)
    if not found or "messages[0]['role'] != 'system'" not in original:
        return CHAT_TEMPLATE
    default = found.group(1).replace("\\", "\\\\").replace("'", "\\'")
    return (
        "{% if messages and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\n" + default + "<|im_end|>\n' }}{% endif %}" + CHAT_TEMPLATE
    )


def micro_batches(config: TrainingConfig, model: Any) -> tuple[int, int]:
    """(per-device batch, gradient accumulation) for ``config.batch_size x grad_accum``.

    trl flattens a packed (padding-free) micro-batch into one row; without varlen attention
    kernels (flash-attention) SDPA then attends over the whole row with a block-diagonal mask,
    quadratic in ``batch_size x max_length``. One packed bin per micro-batch, accumulated,
    trains on the same bins in the same order with the same loss normalisation (measured:
    identical losses) and was 2.9x the padded tokens/s on the tiny model instead of 1.3x.
    """
    attention = str(getattr(getattr(model, "config", None), "_attn_implementation", "") or "")
    if config.packing and "flash" not in attention:
        return 1, config.batch_size * config.grad_accum
    return config.batch_size, config.grad_accum


def emit(kind: str, **fields: Any) -> None:
    print(PROGRESS_PREFIX + json.dumps({"type": kind, **fields}), flush=True)


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest checkpoint that was written completely (a kill can leave a partial one)."""
    if not directory.is_dir():
        return None
    done = []
    for path in directory.glob("checkpoint-*"):
        suffix = path.name.removeprefix("checkpoint-")
        if suffix.isdigit() and (path / CHECKPOINT_MARKER).is_file():
            done.append((int(suffix), path))
    return max(done)[1] if done else None


def code_version() -> str:
    root = Path(__file__).resolve().parents[3]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        sha = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"tuneloop-0.1.0+{sha or 'unknown'}"


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return float(torch.cuda.max_memory_allocated()) / 2**20
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024.0


class Worker:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.config = TrainingConfig(**spec["config"])
        self.work = Path(spec["work_dir"])
        self.state_path = self.work / "state.json"
        self.state: dict[str, Any] = (
            json.loads(self.state_path.read_text())
            if self.state_path.exists()
            else {"phases_done": {}, "resumed_from": []}
        )
        self.checkpoint_every_steps = int(spec.get("checkpoint_every_steps") or 50)
        self.checkpoint_every_s = float(spec.get("checkpoint_every_s") or 600.0)
        self.step_delay_s = float(spec.get("step_delay_s") or 0.0)

    # ----------------------------------------------------------------- setup

    def device(self) -> tuple[str, bool]:
        """(device, bf16): CUDA → bf16 unless the config says fp32; CPU → fp32."""
        import torch

        if torch.cuda.is_available():
            return "cuda", self.config.precision in ("auto", "bf16")
        return "cpu", False

    def load_base(self, device: str, bf16: bool) -> Any:
        import torch
        from transformers import AutoModelForCausalLM

        dtype = torch.bfloat16 if bf16 else torch.float32
        kwargs: dict[str, Any] = {"dtype": dtype}
        if self.config.quantized:
            try:
                from transformers import BitsAndBytesConfig

                kwargs["quantization_config"] = BitsAndBytesConfig(
                    load_in_4bit=True,
                    bnb_4bit_quant_type="nf4",
                    bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=dtype,
                    bnb_4bit_quant_storage=dtype,
                )
                kwargs["device_map"] = {"": 0} if device == "cuda" else {"": "cpu"}
                model = AutoModelForCausalLM.from_pretrained(self.spec["base_model_path"], **kwargs)
            except (ImportError, RuntimeError, ValueError, NotImplementedError) as exc:
                raise PermanentFailure(
                    f"{self.config.method} needs a 4-bit base from bitsandbytes, which failed "
                    f"on this {device} ({exc!r}); a GPU is required for it here",
                    kind="unsupported",
                ) from exc
            from peft import prepare_model_for_kbit_training

            return prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=self.config.gradient_checkpointing
            )
        plain: Any = AutoModelForCausalLM.from_pretrained(self.spec["base_model_path"], **kwargs)
        return plain.to("cuda") if device == "cuda" else plain

    def load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer
        from trl.chat_template_utils import has_generation_markers

        tokenizer = AutoTokenizer.from_pretrained(self.spec["base_model_path"])
        template = tokenizer.chat_template or ""
        vocab = tokenizer.get_vocab()
        # Loss on assistant tokens only needs {% generation %} markers in the template; a
        # ChatML model without them (SmolLM2) gets the same ChatML with markers, keeping its
        # default system prompt. Others are left to trl's own training templates.
        if (
            self.config.assistant_only_loss
            and not has_generation_markers(template)
            and "<|im_start|>" in vocab
        ):
            tokenizer.chat_template = chatml_training_template(template)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = (
                "<|endoftext|>" if "<|endoftext|>" in vocab else tokenizer.eos_token
            )
        return tokenizer

    def peft_model(self, base: Any, previous_adapter: Path | None) -> Any:
        from peft import LoraConfig, PeftModel, get_peft_model

        if previous_adapter is not None:
            return PeftModel.from_pretrained(base, str(previous_adapter), is_trainable=True)
        cfg = self.config
        return get_peft_model(
            base,
            LoraConfig(
                r=cfg.r,
                lora_alpha=cfg.alpha,
                lora_dropout=cfg.dropout,
                target_modules=cfg.target_modules,
                use_dora=cfg.use_dora,
                task_type="CAUSAL_LM",
            ),
        )

    # ----------------------------------------------------------------- one phase

    def train_phase(
        self, index: int, phase: dict[str, Any], tokenizer: Any, device: str, bf16: bool
    ) -> dict[str, Any]:
        import torch
        from datasets import Dataset
        from transformers import TrainerCallback
        from transformers.trainer_callback import PrinterCallback
        from trl import SFTConfig, SFTTrainer  # type: ignore[attr-defined]

        name = phase["name"]
        cfg = self.config
        phase_dir = self.work / "phases" / name
        ckpt_dir = phase_dir / "checkpoints"
        resume = latest_checkpoint(ckpt_dir)
        previous = None
        if index > 0:
            prev_name = self.spec["phases"][index - 1]["name"]
            previous = self.work / "phases" / prev_name / "adapter"
        records = [
            {"messages": json.loads(line)["messages"]}
            for line in Path(phase["file"]).read_text().splitlines()
            if line.strip()
        ]
        dataset = Dataset.from_list(records)
        base = self.load_base(device, bf16)
        model = self.peft_model(base, previous)
        self._trim_steps_log(name, int(resume.name.split("-")[-1]) if resume else 0)
        steps_log = (self.work / "steps.jsonl").open("a")
        worker = self
        started = time.monotonic()
        last_save = [time.monotonic()]
        diverged: list[PermanentFailure] = []

        def diverge(what: str, step: int) -> None:
            diverged.append(
                PermanentFailure(
                    f"training diverged: {what} at step {step} of phase {name}",
                    kind="diverged",
                    detail={"phase": name, "step": step},
                )
            )

        class Progress(TrainerCallback):  # type: ignore[misc]
            def on_log(
                self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any
            ) -> Any:
                loss = (logs or {}).get("loss")
                if loss is None:
                    return control
                loss = float(loss)
                row = {"phase": name, "step": state.global_step, "loss": loss, "pid": os.getpid()}
                steps_log.write(json.dumps(row) + "\n")
                steps_log.flush()
                emit("step", **row)
                bad = non_finite(logs)
                if bad and not diverged:
                    diverge(bad, state.global_step)
                if diverged:
                    # Logging runs before saving in the same step: this state is not a good
                    # checkpoint, so the last one saved stays the last good one.
                    control.should_save = False
                    control.should_training_stop = True
                return control

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
                if worker.step_delay_s:
                    time.sleep(worker.step_delay_s)
                if (worker.work / STOP_FILE).exists():
                    control.should_save = True
                    control.should_training_stop = True
                elif time.monotonic() - last_save[0] > worker.checkpoint_every_s:
                    control.should_save = True
                return control

            def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
                last_save[0] = time.monotonic()
                path = ckpt_dir / f"checkpoint-{state.global_step}"
                trained = kw.get("model")
                if trained is not None and not all(
                    bool(torch.isfinite(p).all()) for p in trained.parameters() if p.requires_grad
                ):
                    # A finite loss can come from weights that already hold inf/NaN.
                    shutil.rmtree(path, ignore_errors=True)
                    if not diverged:
                        diverge("non-finite adapter weights", state.global_step)
                    control.should_training_stop = True
                    return control
                emit("checkpoint", phase=name, step=state.global_step, path=str(path))
                return control

        max_steps = cfg.max_steps_per_phase or -1
        micro_batch, accum = micro_batches(cfg, base)
        args = SFTConfig(
            output_dir=str(ckpt_dir),
            max_steps=max_steps,
            num_train_epochs=cfg.epochs_per_phase,
            per_device_train_batch_size=micro_batch,
            gradient_accumulation_steps=accum,
            learning_rate=cfg.learning_rate,
            lr_scheduler_type=cfg.lr_scheduler,
            warmup_steps=cfg.warmup_ratio,
            weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm,
            max_length=cfg.max_length,
            packing=cfg.packing,
            assistant_only_loss=cfg.assistant_only_loss,
            gradient_checkpointing=cfg.gradient_checkpointing,
            bf16=bf16,
            use_cpu=device == "cpu",
            seed=cfg.seed,
            logging_steps=1,
            save_strategy="steps",
            save_steps=self.checkpoint_every_steps,
            save_total_limit=2,
            report_to=[],
            # The default replaces a NaN/inf loss by the running mean in the logs (it logged
            # 0.0 for a LoRA that had diverged), which would hide a divergence from on_log.
            logging_nan_inf_filter=False,
            disable_tqdm=True,
            dataloader_num_workers=0,
            train_sampling_strategy="sequential" if phase.get("sequential") else "random",
        )
        trainer: Any = SFTTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[Progress()],
        )
        # Progress goes out as @@tuneloop lines; the trainer's own dict printing is noise.
        trainer.remove_callback(PrinterCallback)
        if not bf16:
            # trl casts adapter weights of a 4-bit base to bf16; bf16 is ~12x slower on a CPU.
            for param in trainer.model.parameters():
                if param.requires_grad and param.dtype != torch.float32:
                    param.data = param.data.float()
        if resume is not None:
            self.state["resumed_from"].append({"phase": name, "checkpoint": resume.name})
            emit("resume", phase=name, checkpoint=str(resume))
        try:
            output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        except torch.OutOfMemoryError as exc:
            raise PermanentFailure(f"out of memory in phase {name}: {exc}", kind="oom") from exc
        finally:
            steps_log.close()
        if diverged:
            raise diverged[0]
        if (self.work / STOP_FILE).exists():
            raise SystemExit(EXIT_CANCELLED)
        losses = [
            float(h["loss"])
            for h in trainer.state.log_history
            if "loss" in h and h["loss"] is not None
        ]
        num_tokens = max(
            (float(h["num_tokens"]) for h in trainer.state.log_history if "num_tokens" in h),
            default=0.0,
        )
        runtime = float(output.metrics.get("train_runtime") or (time.monotonic() - started))
        adapter_dir = phase_dir / "adapter"
        trainer.model.save_pretrained(str(adapter_dir))
        tokenizer.save_pretrained(str(adapter_dir))
        return {
            "phase": name,
            "description": phase.get("description", ""),
            "records": len(records),
            "steps": int(trainer.state.global_step),
            "final_loss": losses[-1] if losses else None,
            "first_loss": losses[0] if losses else None,
            "seconds": round(time.monotonic() - started, 3),
            "tokens": num_tokens,
            "tokens_per_second": round(num_tokens / runtime, 2) if runtime > 0 else None,
            "peak_memory_mb": round(peak_memory_mb(), 1),
            "micro_batch": micro_batch,
            "grad_accum": accum,
        }

    # ----------------------------------------------------------------- whole job

    def post_training(self, adapter_dir: Path, tokenizer: Any, device: str, bf16: bool) -> Any:
        """Answer the configured prompts with the adapter; record latency and length."""
        import torch
        from peft import PeftModel

        prompts = self.spec.get("prompts", DEFAULT_PROMPTS)
        max_new = int(self.spec.get("max_new_tokens", 48))
        if not prompts:
            return []
        base = self.load_base(device, bf16)
        model = PeftModel.from_pretrained(base, str(adapter_dir))
        model.eval()
        samples = []
        for prompt in prompts:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            inputs = tokenizer(text, return_tensors="pt").to(model.device)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(
                    **inputs,
                    max_new_tokens=max_new,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
            latency = time.perf_counter() - t0
            new = out[0][inputs["input_ids"].shape[1] :]
            samples.append(
                {
                    "prompt": prompt,
                    "answer": tokenizer.decode(new, skip_special_tokens=True),
                    "tokens": int(new.shape[0]),
                    "latency_s": round(latency, 4),
                }
            )
        return samples

    def run(self) -> dict[str, Any]:
        import torch

        if self.spec.get("threads"):
            torch.set_num_threads(int(self.spec["threads"]))
        torch.manual_seed(self.config.seed)
        device, bf16 = self.device()
        tokenizer = self.load_tokenizer()
        phases_done: dict[str, Any] = self.state["phases_done"]
        for index, phase in enumerate(self.spec["phases"]):
            if phase["name"] in phases_done:
                continue
            emit("phase_start", phase=phase["name"], index=index)
            metrics = self.train_phase(index, phase, tokenizer, device, bf16)
            phases_done[phase["name"]] = metrics
            self._save_state()
            emit("phase_done", **metrics)
            # The phase is done: its checkpoints are no longer needed to resume.
            shutil.rmtree(self.work / "phases" / phase["name"] / "checkpoints", ignore_errors=True)
        last = self.work / "phases" / self.spec["phases"][-1]["name"] / "adapter"
        final = self.work / "adapter"
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(last, final)
        samples = self.post_training(final, tokenizer, device, bf16)
        phases = [phases_done[p["name"]] for p in self.spec["phases"]]
        total_tokens = sum(p["tokens"] for p in phases)
        total_runtime = sum(
            p["tokens"] / p["tokens_per_second"] for p in phases if p.get("tokens_per_second")
        )
        loss_curve = read_steps(self.work / "steps.jsonl")
        metadata = {
            **self.spec.get("metadata", {}),
            "method": self.config.method,
            "resolved_config": self.config.canonical(),
            "device": device,
            "precision": "bf16" if bf16 else "fp32",
            "phases": phases,
            "tokens_per_second": round(total_tokens / total_runtime, 2) if total_runtime else None,
            "peak_memory_mb": max(p["peak_memory_mb"] for p in phases),
            "resumed_from": self.state["resumed_from"],
            "post_training": samples,
            "code_version": code_version(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        }
        (final / "training_metadata.json").write_text(json.dumps(metadata, indent=1))
        (final / "loss_curve.json").write_text(json.dumps(loss_curve))
        return metadata

    def _trim_steps_log(self, phase: str, keep_through: int) -> None:
        """Forget logged steps of ``phase`` after the checkpoint we resume from: they are
        about to be trained again, and the loss curve must not show them twice."""
        path = self.work / "steps.jsonl"
        if not path.exists():
            return
        rows = read_steps(path)
        kept = [r for r in rows if r.get("phase") != phase or r.get("step", 0) <= keep_through]
        if len(kept) != len(rows):
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, path)

    def _save_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.state_path)


def read_steps(path: Path) -> list[dict[str, Any]]:
    """The step log; a line cut short by a kill is skipped."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def write_result(work: Path, result: dict[str, Any]) -> None:
    tmp = work / "result.json.tmp"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, work / "result.json")


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    work = Path(spec["work_dir"])
    (work / "result.json").unlink(missing_ok=True)
    try:
        metadata = Worker(spec).run()
    except PermanentFailure as exc:
        write_result(
            work, {"status": "failed", "kind": exc.kind, "reason": str(exc), "detail": exc.detail}
        )
        return EXIT_PERMANENT
    except SystemExit as exc:
        if exc.code == EXIT_CANCELLED:
            write_result(work, {"status": "cancelled", "reason": "cancelled on request"})
        raise
    except MemoryError as exc:
        write_result(work, {"status": "failed", "kind": "oom", "reason": f"out of memory: {exc}"})
        return EXIT_PERMANENT
    write_result(work, {"status": "done", "metadata": metadata})
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
