"""The trainer's tables: one row per adapter id (the training job that makes it)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, Column, Integer, String, Text
from sqlmodel import Field, SQLModel

from shared.db import UTCDateTime

JOB_STATUSES = ("running", "done", "failed", "cancelled")


class TrainingJob(SQLModel, table=True):
    __tablename__ = "trainer_jobs"

    adapter_id: str = Field(sa_column=Column(String(64), primary_key=True))
    dataset_id: str = Field(sa_column=Column(String(200), nullable=False, index=True))
    base_model: str = Field(sa_column=Column(String(500), nullable=False))
    method: str = Field(sa_column=Column(String(16), nullable=False))
    config_hash: str = Field(sa_column=Column(String(64), nullable=False))
    config_json: str = Field(sa_column=Column(Text, nullable=False))
    status: str = Field(sa_column=Column(String(16), nullable=False))
    owner: str = Field(sa_column=Column(String(200), nullable=False))
    attempts: int = Field(default=0, sa_column=Column(Integer, nullable=False, default=0))
    run_id: str = Field(sa_column=Column(String(200), nullable=False))
    event_id: str = Field(sa_column=Column(String(36), nullable=False))
    phase: str | None = Field(default=None, sa_column=Column(String(50)))
    step: int = Field(default=0, sa_column=Column(Integer, nullable=False, default=0))
    # The last checkpoint in the artifact store (JSON of an ArtifactRef) and where it was.
    checkpoint_ref: str | None = Field(default=None, sa_column=Column(Text))
    checkpoint_phase: str | None = Field(default=None, sa_column=Column(String(50)))
    checkpoint_step: int | None = Field(default=None, sa_column=Column(Integer))
    adapter_ref: str | None = Field(default=None, sa_column=Column(Text))
    metrics_json: str | None = Field(default=None, sa_column=Column(Text))
    reason: str | None = Field(default=None, sa_column=Column(Text))
    cancel_requested: bool = Field(
        default=False, sa_column=Column(Boolean, nullable=False, default=False)
    )
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    updated_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    heartbeat_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
