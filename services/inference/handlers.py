"""Decisions of the inference service, as plain functions (no broker, no processes).

- :func:`plan_for`: which engine serves a model format here, or why it cannot be served;
- :func:`inspect_model`: what in a fetched artifact makes it servable (or refused, before any
  engine sees it: a DoRA adapter, a missing config, a hostile adapter config);
- :func:`promote`: which deployments a promotion makes stable, previous stable, or retired;
- :func:`pick_eviction`: which engine to stop when the engine budget is full.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from services.inference.engines.base import EngineKind
from services.inference.engines.profiles import EngineProfile
from services.inference.models import Deployment
from shared.events import Engine, ModelFormat

# An adapter config larger than this is not a PEFT config.
MAX_CONFIG_BYTES = 1_000_000
GPU_ONLY_FORMATS: frozenset[str] = frozenset({"awq-w4a16", "gptq-w4a16"})


class Refused(ValueError):
    """This artifact cannot be served here; retrying the same event cannot help."""


@dataclass(frozen=True)
class Plan:
    kind: Literal["engine", "lora"]
    engine_kind: EngineKind  # what runs (vllm or llama-cpp)
    engine: Engine  # what ModelDeployed announces: vllm (GPU), vllm-cpu, llama-cpp


def announced_engine(kind: EngineKind, profile: EngineProfile) -> Engine:
    """What ModelDeployed says runs the model: ``llama-cpp``, or vLLM (``vllm`` on a GPU,
    ``vllm-cpu`` without)."""
    if kind == "llama-cpp":
        return "llama-cpp"
    return "vllm" if profile.device == "gpu" else "vllm-cpu"


def plan_for(
    fmt: ModelFormat, *, profile: EngineProfile, gguf_engine: EngineKind = "llama-cpp"
) -> Plan:
    """How a model of format ``fmt`` is served with ``profile`` (raises :class:`Refused`)."""
    engine = announced_engine("vllm", profile)
    if fmt in GPU_ONLY_FORMATS:
        if profile.device != "gpu":
            raise Refused(
                f"{fmt} is a GPU serving format: vLLM's CPU build has no W4A16 kernels "
                "(cpu_gemm_wna16) on this machine; deploy it where INFERENCE_PROFILE is a GPU "
                "profile (l4, spot, 2xt4, quantized), or ask the quantizer for bf16-merged or "
                "gguf-q4_k_m"
            )
        return Plan("engine", "vllm", engine)
    if fmt == "gguf-q4_k_m":
        kind: EngineKind = "llama-cpp" if profile.device == "cpu" else gguf_engine
        return Plan("engine", kind, announced_engine(kind, profile))
    if fmt == "adapter":
        return Plan("lora", "vllm", engine)
    return Plan("engine", "vllm", engine)


@dataclass(frozen=True)
class ModelFiles:
    model_path: str  # what the engine loads: a directory, or a .gguf file
    tokenizer: str | None = None
    lora_rank: int | None = None


def _read_json(path: Path, what: str) -> dict[str, object]:
    if not path.is_file():
        raise Refused(f"the artifact has no {path.name} ({what})")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise Refused(f"{path.name} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise Refused(f"{path.name} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise Refused(f"{path.name} is not a JSON object")
    return data


def inspect_model(path: Path, fmt: ModelFormat, *, max_lora_rank: int) -> ModelFiles:
    """Check a fetched artifact before an engine sees it."""
    if fmt == "adapter":
        cfg = _read_json(path / "adapter_config.json", "a PEFT adapter needs it")
        if cfg.get("use_dora"):
            raise Refused(
                "DoRA adapter refused: vLLM does not support DoRA; the quantizer must merge it "
                "into its base (format bf16-merged) before deployment"
            )
        if cfg.get("peft_type") != "LORA":
            raise Refused(
                f"only plain LoRA adapters hot-load; got peft_type={cfg.get('peft_type')!r}"
            )
        rank = cfg.get("r")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise Refused(f"adapter rank r={rank!r} is not a positive integer")
        if rank > max_lora_rank:
            raise Refused(f"adapter rank {rank} exceeds the engines' max LoRA rank {max_lora_rank}")
        if not any(
            (path / n).is_file() for n in ("adapter_model.safetensors", "adapter_model.bin")
        ):
            raise Refused("the adapter has no adapter_model.safetensors")
        return ModelFiles(model_path=str(path), lora_rank=rank)
    if fmt == "gguf-q4_k_m":
        ggufs = sorted(p for p in path.rglob("*.gguf") if p.is_file())
        if not ggufs:
            raise Refused("the artifact has no .gguf file")
        if len(ggufs) > 1:
            raise Refused(f"the artifact has {len(ggufs)} .gguf files; expected one")
        tokenizer = str(path) if (path / "tokenizer_config.json").is_file() else None
        return ModelFiles(model_path=str(ggufs[0]), tokenizer=tokenizer)
    cfg = _read_json(path / "config.json", "a Hugging Face checkpoint needs it")
    if not isinstance(cfg.get("architectures"), list) and "model_type" not in cfg:
        raise Refused("config.json names no architecture or model_type")
    return ModelFiles(model_path=str(path))


# ------------------------------------------------------------------ lifecycle


@dataclass(frozen=True)
class Promotion:
    stable: str
    previous: str | None
    retire: tuple[str, ...]


def promote(deployments: Sequence[Deployment], deployment_id: str) -> Promotion:
    """The gateway promoted ``deployment_id`` to stable on its line.

    It becomes rank 0; the former stable becomes rank 1 (kept warm for instant rollback);
    every other live deployment of the line that is older than the new stable is retired,
    except engines that host a LoRA deployment that stays.
    """
    by_id = {d.id: d for d in deployments}
    new = by_id.get(deployment_id)
    if new is None:
        raise KeyError(deployment_id)
    line = [d for d in deployments if d.served_model_name == new.served_model_name]
    old_stable = next((d for d in line if d.stable_rank == 0 and d.id != new.id), None)
    previous = (
        old_stable.id
        if old_stable
        else next((d.id for d in line if d.stable_rank == 1 and d.id != new.id), None)
    )
    keep = {new.id} | ({previous} if previous else set())
    retire = {
        d.id
        for d in line
        if d.id not in keep
        and d.status in ("ready", "starting", "stopped")
        and d.created_at <= new.created_at
    }
    # An engine stays while a kept (or not retired) LoRA deployment lives on it.
    for d in deployments:
        if d.host_deployment_id and d.id not in retire and d.status in ("ready", "starting"):
            retire.discard(d.host_deployment_id)
    ordered = sorted(retire, key=lambda i: (by_id[i].has_engine, by_id[i].created_at))
    return Promotion(stable=new.id, previous=previous, retire=tuple(ordered))


def pick_eviction(deployments: Sequence[Deployment], *, max_engines: int) -> str | bool | None:
    """When starting one more engine would exceed ``max_engines``: the engine to stop first
    (oldest that is neither stable, previous stable, nor hosting a live LoRA). Returns False
    when there is room, None when every running engine must stay."""
    engines = [d for d in deployments if d.has_engine and d.status in ("ready", "starting")]
    if len(engines) < max_engines:
        return False
    hosts = {
        d.host_deployment_id
        for d in deployments
        if d.host_deployment_id and d.status in ("ready", "starting")
    }
    candidates = [
        d
        for d in engines
        if d.status == "ready"
        and d.stable_rank is None
        and d.id not in hosts
        and d.role != "baseline"
    ]
    if not candidates:
        return None
    return min(candidates, key=lambda d: d.created_at).id
