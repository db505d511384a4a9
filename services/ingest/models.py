"""Ingest's tables: dataset versions (one row per version of a dataset line) and the
harvester's cursor over the gateway's interactions."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, Integer, String, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from shared.db import UTCDateTime


class DatasetVersion(SQLModel, table=True):
    __tablename__ = "ingest_dataset_versions"
    __table_args__ = (
        # Two writers racing to extend the same line: only one gets version N+1.
        UniqueConstraint("dataset_name", "version", name="uq_ingest_dataset_line_version"),
    )

    dataset_id: str = Field(sa_column=Column(String(64), primary_key=True))
    dataset_name: str = Field(sa_column=Column(String(200), nullable=False))
    version: int = Field(sa_column=Column(Integer, nullable=False))
    previous_dataset_id: str | None = Field(default=None, sa_column=Column(String(64)))
    origin: str = Field(sa_column=Column(String(20), nullable=False))
    run_id: str = Field(sa_column=Column(String(200), nullable=False))
    event_id: str = Field(sa_column=Column(String(36), nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    train_count: int = Field(sa_column=Column(Integer, nullable=False))
    validation_count: int = Field(sa_column=Column(Integer, nullable=False))
    # The DatasetReady payload's artifact refs and counts, as JSON (the event is the contract).
    artifacts: str = Field(sa_column=Column(Text, nullable=False))
    report_uri: str = Field(sa_column=Column(String(2048), nullable=False))


class DatasetRun(SQLModel, table=True):
    """One announced run of a dataset version: its ``DatasetReady``. A version has one per
    distinct training spec (the spec is not data: another spec on the same content is a
    retrain of the same version, not a new version)."""

    __tablename__ = "ingest_dataset_runs"

    dataset_id: str = Field(sa_column=Column(String(64), primary_key=True))
    # sha256 of the canonical TrainingSpec JSON ("null" when the trainer's own settings).
    training_key: str = Field(sa_column=Column(String(64), primary_key=True))
    run_id: str = Field(sa_column=Column(String(200), nullable=False))
    event_id: str = Field(sa_column=Column(String(36), nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


class HarvestCursor(SQLModel, table=True):
    __tablename__ = "ingest_harvest_cursors"

    dataset_name: str = Field(sa_column=Column(String(200), primary_key=True))
    # The last interaction harvested, in (created_at, id) order.
    last_created_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime()))
    last_id: str | None = Field(default=None, sa_column=Column(String(64)))
    # Positive feedback given after the interaction was scanned: the last feedback_at read.
    feedback_after: datetime | None = Field(default=None, sa_column=Column(UTCDateTime()))
    # Optimistic lock: a replica advances the cursor only from the value it read.
    generation: int = Field(default=0, sa_column=Column(Integer, nullable=False))
    updated_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
