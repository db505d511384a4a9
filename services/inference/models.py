"""Inference's tables: one row per deployment (an engine, or a LoRA adapter on an engine)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from sqlalchemy import Column, Float, Integer, String, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from shared.db import UTCDateTime, utcnow

Status = Literal["starting", "ready", "stopped", "failed", "retired", "gone"]
# Rows whose engine should be running (re-adopted or restarted at start-up).
LIVE_STATUSES: tuple[str, ...] = ("starting", "ready", "stopped")


class Deployment(SQLModel, table=True):
    __tablename__ = "inference_deployments"
    __table_args__ = (UniqueConstraint("dedupe_key", name="uq_inference_deployments_dedupe"),)

    id: str = Field(sa_column=Column(String(64), primary_key=True))
    # What makes a second delivery a no-op: "model:<model_id>:<format>:<line>" or
    # "baseline:<base_model>:<line>".
    dedupe_key: str = Field(sa_column=Column(String(255), nullable=False))
    run_id: str = Field(sa_column=Column(String(200), nullable=False))
    source_event_id: str | None = Field(default=None, sa_column=Column(String(36)))
    # W3C traceparent of the handler that created it: work finished after a crash joins it.
    trace_parent: str | None = Field(default=None, sa_column=Column(String(64)))
    model_id: str = Field(sa_column=Column(String(200), nullable=False))
    adapter_id: str | None = Field(default=None, sa_column=Column(String(200)))
    dataset_id: str | None = Field(default=None, sa_column=Column(String(200)))
    base_model: str = Field(sa_column=Column(String(500), nullable=False))
    format: str = Field(sa_column=Column(String(32), nullable=False))
    role: str = Field(sa_column=Column(String(16), nullable=False))
    # The line (gateway routes by it) and the name the engine knows this model by.
    served_model_name: str = Field(sa_column=Column(String(200), nullable=False))
    upstream_name: str = Field(sa_column=Column(String(200), nullable=False))
    engine: str = Field(sa_column=Column(String(32), nullable=False))  # vllm, vllm-cpu, llama-cpp
    mode: str = Field(sa_column=Column(String(16), nullable=False))  # local, k8s
    profile: str = Field(sa_column=Column(String(64), nullable=False))
    status: str = Field(sa_column=Column(String(16), nullable=False))
    # 0 = the line's stable, 1 = the previous stable (kept warm for rollback), None = neither.
    stable_rank: int | None = Field(default=None, sa_column=Column(Integer))
    # A LoRA deployment lives on another deployment's engine.
    host_deployment_id: str | None = Field(default=None, sa_column=Column(String(64)))
    artifact_uri: str | None = Field(default=None, sa_column=Column(String(2048)))
    artifact_sha256: str | None = Field(default=None, sa_column=Column(String(64)))
    artifact_size: int | None = Field(default=None, sa_column=Column(Integer))
    validation_json: str | None = Field(default=None, sa_column=Column(Text))
    model_path: str | None = Field(default=None, sa_column=Column(String(2048)))
    endpoint: str | None = Field(default=None, sa_column=Column(String(2048)))
    port: int | None = Field(default=None, sa_column=Column(Integer))
    pid: int | None = Field(default=None, sa_column=Column(Integer))
    k8s_name: str | None = Field(default=None, sa_column=Column(String(63)))
    log_path: str | None = Field(default=None, sa_column=Column(String(2048)))
    log_uri: str | None = Field(default=None, sa_column=Column(String(2048)))
    reason: str | None = Field(default=None, sa_column=Column(Text))
    fetch_s: float | None = Field(default=None, sa_column=Column(Float))
    start_s: float | None = Field(default=None, sa_column=Column(Float))
    ready_s: float | None = Field(default=None, sa_column=Column(Float))
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False)
    )
    updated_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False)
    )
    ready_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime()))

    @property
    def has_engine(self) -> bool:
        return self.host_deployment_id is None
