"""Trainer settings (``TRAINER_*`` environment variables), validated at start-up."""

from __future__ import annotations

import os
import socket
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.trainer.training.config import (
    METHODS,
    PROFILES,
    ConfigError,
    ConfigLimits,
    Layer,
    TrainingConfig,
    resolve_config,
)
from services.trainer.training.worker import DEFAULT_PROMPTS
from shared.basemodels import SMOLLM2, TINY
from shared.events import TrainingMethod


class TrainerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRAINER_", extra="ignore")

    http_port: int = Field(default=0, ge=-1, le=65535)
    # What to train: a named profile, a method, per-deployment overrides of the profile.
    profile: str = "cpu-smol"
    method: TrainingMethod | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)
    base_model: str = Field(default="smollm2-135m-instruct", min_length=1, max_length=500)
    # Base models a run's TrainingSpec may pick (besides base_model): exact names, each a
    # built-in one or an absolute checkpoint path; never a hub id (no downloads at run time).
    allowed_base_models: list[str] = Field(default_factory=lambda: [TINY, SMOLLM2], max_length=100)
    # Policy: methods refused with a TrainingFailed (never swapped for another).
    forbidden_methods: list[str] = Field(default_factory=list)
    # Upper bounds on any resolved config (profile, overrides, a run's spec).
    limits: ConfigLimits = Field(default_factory=ConfigLimits)
    # Where jobs train (checkpoints, logs); default $TUNELOOP_HOME/trainer/work.
    work_dir: Path | None = None
    checkpoint_every_steps: int = Field(default=50, ge=1)
    checkpoint_every_s: float = Field(default=600.0, gt=0)
    # The bus: heartbeats every ack_wait/3; a crash is redelivered after ack_wait.
    ack_wait_s: float = Field(default=60.0, gt=0)
    max_deliver: int = Field(default=10, ge=1)
    # A running job whose heartbeat is older than this is taken over (its owner died).
    lease_s: float = Field(default=180.0, gt=0)
    # Post-training protocol: prompts answered with the adapter (latency and length recorded).
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS))
    max_new_tokens: int = Field(default=48, ge=1, le=4096)
    threads: int | None = Field(default=None, ge=1, le=1024)
    keep_work_dir: bool = False
    # Fault-injection for tests and demos: sleep after each optimizer step.
    step_delay_s: float = Field(default=0.0, ge=0, le=60)
    worker_id: str = Field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")

    @field_validator("profile")
    @classmethod
    def _profile(cls, value: str) -> str:
        if value not in PROFILES:
            raise ValueError(f"unknown profile {value!r}; choose from {sorted(PROFILES)}")
        return value

    @field_validator("forbidden_methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        unknown = [m for m in value if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
        return value

    @field_validator("allowed_base_models")
    @classmethod
    def _allowed_base_models(cls, value: list[str]) -> list[str]:
        for name in value:
            if name in (TINY, SMOLLM2):
                continue
            path = PurePosixPath(name)
            if not path.is_absolute() or ".." in path.parts or len(name) > 500:
                raise ValueError(
                    f"allowed base model {name[:100]!r}: use {TINY!r}, {SMOLLM2!r} or an "
                    "absolute checkpoint path (hub ids are never downloaded at run time)"
                )
        return value

    @model_validator(mode="after")
    def _config(self) -> TrainerSettings:
        """The profile with TRAINER_OVERRIDES / TRAINER_METHOD must resolve within the limits:
        a bad deployment fails at start-up, not per event. (A forbidden default method is
        refused per event, with a TrainingFailed: a run's spec may pick another.)"""
        try:
            resolve_config(self.profile, layers=[self.settings_layer()], limits=self.limits)
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
        return self

    def settings_layer(self) -> Layer:
        return Layer("TRAINER_OVERRIDES/TRAINER_METHOD", self.overrides, self.method)

    def resolve(
        self, *layers: Layer, profile: str | None = None, profile_source: str = ""
    ) -> TrainingConfig:
        """The resolved :class:`TrainingConfig`: profile → these settings → ``layers``."""
        return resolve_config(
            profile or self.profile,
            layers=[self.settings_layer(), *layers],
            forbidden_methods=set(self.forbidden_methods),
            limits=self.limits,
            profile_source=profile_source,
        )

    def resolved_work_dir(self, home: Path) -> Path:
        return (self.work_dir or home / "trainer" / "work").resolve()
