"""The quantizer's table: one row per (adapter, target), whatever became of it."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, Float, Integer, String, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from shared.db import UTCDateTime, utcnow


class QuantizedModel(SQLModel, table=True):
    __tablename__ = "quantizer_models"
    __table_args__ = (UniqueConstraint("adapter_id", "format", name="uq_quantizer_adapter_format"),)

    id: int | None = Field(default=None, sa_column=Column(Integer, primary_key=True))
    model_id: str = Field(sa_column=Column(String(200), nullable=False))
    adapter_id: str = Field(sa_column=Column(String(200), nullable=False))
    format: str = Field(sa_column=Column(String(32), nullable=False))
    # accepted (AdapterQuantized emitted) | rejected (failed the gate) | failed
    status: str = Field(sa_column=Column(String(16), nullable=False))
    run_id: str = Field(sa_column=Column(String(200), nullable=False))
    training_event_id: str = Field(sa_column=Column(String(36), nullable=False))
    base_model: str = Field(sa_column=Column(String(500), nullable=False))
    dataset_id: str | None = Field(default=None, sa_column=Column(String(200)))
    artifact_uri: str | None = Field(default=None, sa_column=Column(String(2048)))
    artifact_sha256: str | None = Field(default=None, sa_column=Column(String(64)))
    size_bytes: int | None = Field(default=None, sa_column=Column(BigInteger))
    perplexity_before: float | None = Field(default=None, sa_column=Column(Float))
    perplexity_after: float | None = Field(default=None, sa_column=Column(Float))
    relative_increase: float | None = Field(default=None, sa_column=Column(Float))
    seconds: float | None = Field(default=None, sa_column=Column(Float))
    reason: str | None = Field(default=None, sa_column=Column(Text))
    report_uri: str | None = Field(default=None, sa_column=Column(String(2048)))
    event_id: str = Field(sa_column=Column(String(36), nullable=False))
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False)
    )
