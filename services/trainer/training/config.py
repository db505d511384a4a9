"""Training configuration: named profiles, overrides, the resolved config and its hash.

The resolved config is what decides the adapter: ``adapter_id = hash(dataset id, base model,
resolved config)``, so the same data trained the same way always gets the same id, and a
second ``DatasetReady`` for it finds the adapter already done.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.events import TrainingMethod

METHODS: tuple[TrainingMethod, ...] = ("dora", "qdora", "lora", "qlora")
QUANTIZED_METHODS = frozenset({"qdora", "qlora"})
DORA_METHODS = frozenset({"dora", "qdora"})

# Bump when a change in the training code should produce new adapters for the same config.
CONFIG_SCHEMA = 1


class ConfigError(ValueError):
    """An unknown profile, an invalid override, or a forbidden method: retrying cannot help."""


class TrainingConfig(BaseModel):
    """Everything that decides how an adapter is trained (hashed into the adapter id)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: TrainingMethod = "dora"
    r: int = Field(default=16, ge=1, le=1024)
    alpha: int = Field(default=32, ge=1, le=4096)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"
    learning_rate: float = Field(default=2e-4, gt=0.0, le=1.0)
    batch_size: int = Field(default=2, ge=1, le=4096)
    grad_accum: int = Field(default=1, ge=1, le=1024)
    max_length: int = Field(default=512, ge=16, le=131072)
    epochs_per_phase: float = Field(default=1.0, gt=0.0, le=100.0)
    # A cap on optimizer steps per phase (None: epochs decide).
    max_steps_per_phase: int | None = Field(default=None, ge=1, le=10_000_000)
    warmup_ratio: float = Field(default=0.03, ge=0.0, le=0.5)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    max_grad_norm: float = Field(default=1.0, gt=0.0, le=1000.0)
    # Sequence packing (best-fit decreasing) with padding-free batches.
    packing: bool = True
    gradient_checkpointing: bool = False
    # "auto": bf16 on CUDA, fp32 on CPU (bf16 is ~12x slower than fp32 on an AVX2 CPU).
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    assistant_only_loss: bool = True
    seed: int = Field(default=42, ge=0, le=2**31 - 1)
    # Curriculum phases to train, in order; "all" phases of the manifest when None.
    phases: list[str] | None = None

    @field_validator("target_modules")
    @classmethod
    def _modules(cls, value: str | list[str]) -> str | list[str]:
        names = [value] if isinstance(value, str) else value
        if not names or len(names) > 64:
            raise ValueError("target_modules: 1-64 module names")
        for name in names:
            if not name or len(name) > 100 or not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"target module name {name!r} is not a plain identifier")
        return value

    @field_validator("phases")
    @classmethod
    def _phases(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value or len(value) > 26 or len(set(value)) != len(value):
                raise ValueError("phases: 1-26 distinct phase names")
            for phase in value:
                if not (phase.isascii() and phase.isalnum() and len(phase) <= 20):
                    raise ValueError(f"phase name {phase!r} must be short and alphanumeric")
        return value

    @property
    def quantized(self) -> bool:
        return self.method in QUANTIZED_METHODS

    @property
    def use_dora(self) -> bool:
        return self.method in DORA_METHODS

    def canonical(self) -> dict[str, Any]:
        return {"schema": CONFIG_SCHEMA, **self.model_dump(mode="json")}

    def config_hash(self) -> str:
        """sha256 of the canonical JSON of the resolved config (first 16 hex digits)."""
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# The seeds' H100 recipe (train-and-quantize-h100.sh): r=128, alpha=256, all linear layers.
PROFILES: dict[str, dict[str, Any]] = {
    "h100": {
        "r": 128,
        "alpha": 256,
        "dropout": 0.05,
        "learning_rate": 2e-4,
        "batch_size": 16,
        "grad_accum": 4,
        "max_length": 2048,
        "epochs_per_phase": 2.0,
        "precision": "bf16",
        "gradient_checkpointing": True,
    },
    # Seconds on the tiny test model; high lr because the base is random-init and tiny.
    "cpu-tiny": {
        "r": 16,
        "alpha": 32,
        "dropout": 0.0,
        "learning_rate": 2e-3,
        "batch_size": 8,
        "max_length": 256,
        "epochs_per_phase": 1.0,
        "max_steps_per_phase": 30,
        "warmup_ratio": 0.0,
        "lr_scheduler": "constant",
        "precision": "fp32",
    },
    # The SmolLM2-135M demo on a CPU (~5-10 s a step at seq 256, batch 2).
    "cpu-smol": {
        "r": 16,
        "alpha": 32,
        "dropout": 0.05,
        "learning_rate": 5e-4,
        "batch_size": 2,
        "grad_accum": 1,
        "max_length": 256,
        "epochs_per_phase": 1.0,
        "max_steps_per_phase": 60,
        "precision": "fp32",
        # Measured: 6.0 s/step with checkpointing, 4.6 s without at this size.
        "gradient_checkpointing": False,
    },
}


def resolve_config(
    profile: str,
    *,
    method: str | None = None,
    overrides: dict[str, Any] | None = None,
    forbidden_methods: frozenset[str] | set[str] = frozenset(),
) -> TrainingConfig:
    """Profile → overrides → method; refuses forbidden methods (never swaps them)."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown training profile {profile!r}; choose from {sorted(PROFILES)}")
    values: dict[str, Any] = {**PROFILES[profile], **(overrides or {})}
    if method is not None:
        values["method"] = method
    try:
        config = TrainingConfig(**values)
    except ValidationError as exc:
        raise ConfigError(f"invalid training config: {exc}") from exc
    if config.method in forbidden_methods:
        raise ConfigError(
            f"training method {config.method!r} is forbidden by policy "
            f"(forbidden: {sorted(forbidden_methods)}); refusing instead of using another method"
        )
    return config


def adapter_id_for(dataset_id: str, base_model: str, config: TrainingConfig) -> str:
    """``adp-`` + 20 hex digits of sha256(dataset id, base model, resolved config)."""
    blob = json.dumps(
        {"dataset_id": dataset_id, "base_model": base_model, "config": config.canonical()},
        sort_keys=True,
        separators=(",", ":"),
    )
    return "adp-" + hashlib.sha256(blob.encode()).hexdigest()[:20]
