"""Inference settings, from ``INFERENCE_*`` environment variables (validated at start-up)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ROOT = Path(__file__).resolve().parent.parent.parent


def gpu_available() -> bool:
    """True when ``nvidia-smi`` lists at least one GPU."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and b"GPU" in out.stdout


class InferenceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INFERENCE_", extra="ignore")

    http_port: int = Field(default=0, ge=-1, le=65535)
    http_host: str = "127.0.0.1"
    mode: Literal["local", "k8s"] = "local"
    # The line every deployment joins (the gateway routes by it).
    served_model_name: str = Field(default="tuneloop", pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")
    # Base model deployed as role="baseline" at start-up ("" = none): tiny, smollm2-135m-instruct,
    # an absolute path or a hub id (see shared.basemodels).
    baseline_model: str = Field(default="", max_length=500)
    # Named engine profile (see engines/profiles.py); "auto" = "cpu" without a GPU, else "l4".
    profile: str = "auto"
    # Per-setting overrides of the profile, JSON, e.g. {"max_model_len": 512}.
    profile_overrides: dict[str, object] = Field(default_factory=dict)
    gpu: bool | None = None  # None = detect with nvidia-smi
    vllm_python: Path = ROOT / ".venvs" / "vllm" / "bin" / "python"
    # GGUF on a CPU: llama.cpp (llama-cpp-python's server) or vLLM's GGUF loader.
    gguf_engine: Literal["llama-cpp", "vllm"] = "llama-cpp"
    llama_cpp_python: Path | None = None  # default: the service's own interpreter
    host: str = "127.0.0.1"
    # Engines alive at once (each holds the model weights and a KV cache in memory).
    max_engines: int = Field(default=3, ge=1, le=64)
    start_timeout_s: float = Field(default=300.0, gt=0)
    smoke_timeout_s: float = Field(default=60.0, gt=0)
    stop_timeout_s: float = Field(default=20.0, gt=0)
    # Deliveries of AdapterQuantized can take minutes (engine start-up): heartbeat inside this.
    ack_wait_s: float = Field(default=60.0, gt=0)
    log_tail_bytes: int = Field(default=64_000, ge=1000, le=10_000_000)
    # LoRA hot-loading on base engines.
    enable_lora: bool = True
    max_loras: int = Field(default=4, ge=1, le=64)
    max_lora_rank: int = Field(default=64, ge=1, le=512)
    # How often engines that should be serving are checked (a dead one is restarted); 0 = never.
    watch_interval_s: float = Field(default=15.0, ge=0)
    # Stop the engines when the service stops (a crash leaves them for the next start to adopt).
    stop_engines_on_exit: bool = True
    # k8s mode
    k8s_namespace: str = "tuneloop"
    k8s_image: str = "vllm/vllm-openai:v0.32.0"
    k8s_models_pvc: str = "tuneloop-models"
    k8s_apply: bool = True

    @field_validator("baseline_model")
    @classmethod
    def _no_newlines(cls, value: str) -> str:
        if any(c in value for c in "\n\r\0"):
            raise ValueError("baseline_model must be one line")
        return value

    def has_gpu(self) -> bool:
        return gpu_available() if self.gpu is None else self.gpu

    def profile_name(self) -> str:
        if self.profile != "auto":
            return self.profile
        return "l4" if self.has_gpu() else "cpu"
