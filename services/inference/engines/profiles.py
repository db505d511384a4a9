"""Engine profiles: the seeds' deployment modes (l4 / spot / 2xt4 / quantized) as named sets of
vLLM settings, plus ``cpu`` for a machine without a GPU. A deployment picks a profile by name
and may override single settings (from configuration)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ProfileError(ValueError):
    """An unknown profile or an invalid override: retrying cannot help."""


class EngineProfile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    device: Literal["cpu", "gpu"]
    dtype: Literal["auto", "float32", "bfloat16", "float16", "half"] = "auto"
    max_model_len: int = Field(default=2048, ge=64, le=1_048_576)
    tensor_parallel_size: int = Field(default=1, ge=1, le=16)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    quantization: str | None = Field(default=None, pattern=r"^[a-z0-9_\-]{1,40}$")
    enforce_eager: bool = False
    max_num_seqs: int = Field(default=64, ge=1, le=4096)
    # CPU only: GiB of KV cache (vLLM's VLLM_CPU_KVCACHE_SPACE).
    cpu_kv_cache_gib: int = Field(default=1, ge=1, le=512)

    def with_overrides(self, overrides: dict[str, Any]) -> EngineProfile:
        if not overrides:
            return self
        if "name" in overrides or "device" in overrides:
            raise ProfileError("a profile's name and device cannot be overridden")
        try:
            return EngineProfile.model_validate({**self.model_dump(), **overrides})
        except ValidationError as exc:
            raise ProfileError(f"invalid profile override {overrides!r}: {exc}") from exc


PROFILES: dict[str, EngineProfile] = {
    # No GPU: float32 (bf16 is ~12x slower on this AVX2 CPU), eager mode (no graph capture),
    # a small KV cache and short context so several engines fit in memory.
    "cpu": EngineProfile(
        name="cpu",
        device="cpu",
        dtype="float32",
        max_model_len=1024,
        enforce_eager=True,
        max_num_seqs=16,
        cpu_kv_cache_gib=1,
    ),
    # One L4 (24 GB): the seeds' default production mode.
    "l4": EngineProfile(
        name="l4", device="gpu", dtype="bfloat16", max_model_len=4096, gpu_memory_utilization=0.9
    ),
    # Spot/preemptible L4: same shape, eager (fast restart after preemption), less memory.
    "spot": EngineProfile(
        name="spot",
        device="gpu",
        dtype="bfloat16",
        max_model_len=4096,
        gpu_memory_utilization=0.85,
        enforce_eager=True,
    ),
    # Two T4s (16 GB each, no bf16): fp16, tensor parallel 2.
    "2xt4": EngineProfile(
        name="2xt4",
        device="gpu",
        dtype="float16",
        max_model_len=2048,
        tensor_parallel_size=2,
        gpu_memory_utilization=0.9,
    ),
    # A W4A16 checkpoint (compressed-tensors) on one GPU.
    "quantized": EngineProfile(
        name="quantized",
        device="gpu",
        dtype="float16",
        max_model_len=4096,
        quantization="compressed-tensors",
        gpu_memory_utilization=0.9,
    ),
}


def get_profile(name: str, overrides: dict[str, Any] | None = None) -> EngineProfile:
    try:
        profile = PROFILES[name]
    except KeyError:
        raise ProfileError(
            f"unknown engine profile {name!r}; choose from {sorted(PROFILES)}"
        ) from None
    return profile.with_overrides(overrides or {})
