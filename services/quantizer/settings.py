"""Quantizer settings (env prefix ``QUANTIZER_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.quantizer.quantization.pipeline import JobSettings
from shared.basemodels import SMOLLM2, TINY
from shared.events import ModelFormat


def _default_targets() -> list[ModelFormat]:
    return ["bf16-merged"]


class QuantizerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QUANTIZER_", extra="ignore")

    http_port: int = Field(default=0, ge=-1, le=65535)
    # What to produce for each TrainingDone: per base model, else the default. vLLM's CPU
    # build serves only float models, so the embedded default is the merged model; a GPU
    # profile would say e.g. {"*": ["awq-w4a16"]}.
    default_targets: list[ModelFormat] = Field(default_factory=_default_targets)
    targets_by_base_model: dict[str, list[ModelFormat]] = Field(default_factory=dict)
    # Quality gate: relative validation-perplexity increase allowed per target.
    max_ppl_increase: float = Field(default=0.05, ge=0)
    # "bf16-merged" is saved in this dtype: float32 on a CPU (bf16 is ~12x slower here).
    save_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_eval_records: int = Field(default=64, ge=1, le=100_000)
    max_eval_tokens: int = Field(default=256, ge=8, le=32_768)
    calibration_samples: int = Field(default=16, ge=1, le=4096)
    calibration_max_tokens: int = Field(default=256, ge=8, le=32_768)
    group_size: int = Field(default=128, ge=16)
    generations: int = Field(default=3, ge=0, le=50)
    max_new_tokens: int = Field(default=24, ge=1, le=1024)
    verify_merge: bool = True
    merge_tolerance: float = Field(default=1e-3, gt=0)
    # Hostile-input limits.
    allowed_base_models: list[str] = Field(default_factory=lambda: [TINY, SMOLLM2])
    allow_local_base_paths: bool = False
    max_adapter_bytes: int = Field(default=4 * 1024**3, ge=1)
    max_validation_bytes: int = Field(default=64 * 1024**2, ge=1)
    require_validation: bool = True
    work_dir: Path | None = None
    # Bus: quantization heartbeats every ack_wait/3.
    ack_wait_s: float = Field(default=60.0, gt=0)

    def targets_for(self, base_model: str) -> list[str]:
        chosen = self.targets_by_base_model.get(base_model)
        if chosen is None:
            chosen = self.targets_by_base_model.get("*", self.default_targets)
        return list(dict.fromkeys(chosen))

    def base_model_allowed(self, name: str) -> bool:
        if name in self.allowed_base_models:
            return True
        return self.allow_local_base_paths and name.startswith("/") and ".." not in name

    def job_settings(self) -> JobSettings:
        return JobSettings(
            save_dtype=self.save_dtype,
            max_ppl_increase=self.max_ppl_increase,
            max_eval_records=self.max_eval_records,
            max_eval_tokens=self.max_eval_tokens,
            calibration_samples=self.calibration_samples,
            calibration_max_tokens=self.calibration_max_tokens,
            group_size=self.group_size,
            generations=self.generations,
            max_new_tokens=self.max_new_tokens,
            verify_merge=self.verify_merge,
            merge_tolerance=self.merge_tolerance,
            max_validation_bytes=self.max_validation_bytes,
        )
