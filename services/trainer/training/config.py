"""Training configuration: named profiles, overrides, the resolved config and its hash.

The resolved config is what decides the adapter: ``adapter_id = hash(dataset id, base model,
resolved config)``, so the same data trained the same way always gets the same id, and a
second ``DatasetReady`` for it finds the adapter already done.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

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


FIELDS = frozenset(TrainingConfig.model_fields)


class ConfigLimits(BaseModel):
    """Upper bounds on a resolved config (``TRAINER_LIMITS``), whatever asked for it: the
    profile, ``TRAINER_OVERRIDES`` or a run's ``TrainingSpec``. They keep one event from
    occupying a trainer for days or asking for a batch no machine holds; every built-in
    profile fits the defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_steps_per_phase: int = Field(default=100_000, ge=1)
    epochs_per_phase: float = Field(default=10.0, gt=0)
    r: int = Field(default=512, ge=1)
    batch_size: int = Field(default=256, ge=1)
    grad_accum: int = Field(default=256, ge=1)
    max_length: int = Field(default=32_768, ge=16)
    # batch_size × max_length: the tokens of one micro-batch (the h100 profile: 32k).
    batch_tokens: int = Field(default=262_144, ge=16)

    def violations(self, config: TrainingConfig) -> list[tuple[str, str]]:
        """(fields, message) for each bound the config is over (fields comma-separated)."""
        out = []
        for name in ("max_steps_per_phase", "epochs_per_phase", "r", "batch_size", "grad_accum"):
            value, limit = getattr(config, name), getattr(self, name)
            if value is not None and value > limit:
                out.append((name, f"{name}={value} is over the limit {limit}"))
        if config.max_length > self.max_length:
            out.append(
                (
                    "max_length",
                    f"max_length={config.max_length} is over the limit {self.max_length}",
                )
            )
        tokens = config.batch_size * config.max_length
        if tokens > self.batch_tokens:
            out.append(
                (
                    "batch_size,max_length",
                    f"batch_size x max_length = {tokens} tokens is over the limit "
                    f"{self.batch_tokens}",
                )
            )
        return out


@dataclass(frozen=True)
class Layer:
    """One source of settings over the profile, applied in order (later layers win)."""

    source: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    method: str | None = None


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
    overrides: Mapping[str, Any] | None = None,
    layers: Sequence[Layer] = (),
    forbidden_methods: frozenset[str] | set[str] = frozenset(),
    limits: ConfigLimits | None = None,
    profile_source: str = "",
) -> TrainingConfig:
    """Profile → ``overrides``/``method`` → each of ``layers`` in order; validated strictly
    (no type coercion), checked against ``limits``, forbidden methods refused (never swapped).

    Every refusal is a :class:`ConfigError` that names the field and where its value came
    from.
    """
    if profile not in PROFILES:
        raise ConfigError(
            f"unknown training profile {profile!r}{_from(profile_source)}; "
            f"choose from {sorted(PROFILES)}"
        )
    stack = [Layer("", overrides or {}, method), *layers]
    values: dict[str, Any] = dict(PROFILES[profile])
    origin: dict[str, str] = dict.fromkeys(values, f"profile {profile}")
    for layer in stack:
        unknown = sorted(set(layer.overrides) - FIELDS)
        if unknown:
            raise ConfigError(
                f"unknown training setting(s) {[k[:50] for k in unknown[:5]]}"
                f"{_from(layer.source)}; known: {sorted(FIELDS)}"
            )
        values.update(layer.overrides)
        origin.update(dict.fromkeys(layer.overrides, layer.source))
        if layer.method is not None:
            values["method"] = layer.method
            origin["method"] = layer.source
    try:
        config = TrainingConfig.model_validate(values, strict=True)
    except ValidationError as exc:
        problems = []
        for err in exc.errors()[:5]:
            name = str(err["loc"][0]) if err["loc"] else "config"
            got = repr(err.get("input"))
            got = got if len(got) <= 60 else got[:57] + "..."
            problems.append(f"{name}: {err['msg']} (got {got}{_from(origin.get(name, ''))})")
        raise ConfigError("invalid training config: " + "; ".join(problems)) from exc
    over = (limits or ConfigLimits()).violations(config)
    if over:
        raise ConfigError(
            "training config over the trainer's limits (TRAINER_LIMITS): "
            + "; ".join(
                msg
                + _from(" and ".join(dict.fromkeys(origin.get(n, "") for n in names.split(","))))
                for names, msg in over
            )
        )
    if config.method in forbidden_methods:
        raise ConfigError(
            f"training method {config.method!r} is forbidden by policy (forbidden: "
            f"{sorted(forbidden_methods)}{_from(origin.get('method', ''))}); refusing instead "
            "of using another method"
        )
    return config


def _from(source: str) -> str:
    return f", from {source}" if source else ""


def adapter_id_for(dataset_id: str, base_model: str, config: TrainingConfig) -> str:
    """``adp-`` + 20 hex digits of sha256(dataset id, base model, resolved config)."""
    blob = json.dumps(
        {"dataset_id": dataset_id, "base_model": base_model, "config": config.canonical()},
        sort_keys=True,
        separators=(",", ":"),
    )
    return "adp-" + hashlib.sha256(blob.encode()).hexdigest()[:20]
