"""The evaluator's tables: deployments it has seen, the stable deployment per served model
name, and benchmark runs (one per deployment and benchmark version: the idempotency key for
a redelivered ModelDeployed and the cache of baseline results)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, Column, Float, Integer, String, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from shared.db import UTCDateTime


class EvaluatorDeployment(SQLModel, table=True):
    __tablename__ = "evaluator_deployments"

    deployment_id: str = Field(sa_column=Column(String(200), primary_key=True))
    model_id: str = Field(sa_column=Column(String(200), nullable=False))
    served_model_name: str = Field(sa_column=Column(String(200), nullable=False, index=True))
    endpoint: str = Field(sa_column=Column(String(2048), nullable=False))
    role: str = Field(sa_column=Column(String(20), nullable=False))
    engine: str = Field(sa_column=Column(String(20), nullable=False))
    deployed_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


class EvaluatorStable(SQLModel, table=True):
    """Which deployment is production for a served model name: the baseline until the
    gateway promotes a candidate."""

    __tablename__ = "evaluator_stable"

    served_model_name: str = Field(sa_column=Column(String(200), primary_key=True))
    deployment_id: str = Field(sa_column=Column(String(200), nullable=False))
    source: str = Field(sa_column=Column(String(20), nullable=False))  # baseline | promoted
    since: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


class EvaluatorRun(SQLModel, table=True):
    __tablename__ = "evaluator_runs"
    __table_args__ = (
        UniqueConstraint("deployment_id", "benchmark_version", name="uq_evaluator_runs_dep_ver"),
    )

    id: int | None = Field(default=None, sa_column=Column(Integer, primary_key=True))
    deployment_id: str = Field(sa_column=Column(String(200), nullable=False))
    benchmark: str = Field(sa_column=Column(String(200), nullable=False))
    benchmark_version: str = Field(sa_column=Column(String(64), nullable=False))
    kind: str = Field(sa_column=Column(String(20), nullable=False))  # candidate | baseline
    status: str = Field(sa_column=Column(String(20), nullable=False))  # completed | failed
    passed: bool | None = Field(default=None, sa_column=Column(Boolean))
    overall_score: float | None = Field(default=None, sa_column=Column(Float))
    summary: str = Field(default="{}", sa_column=Column(Text, nullable=False))
    reason: str | None = Field(default=None, sa_column=Column(Text))
    report_uri: str | None = Field(default=None, sa_column=Column(String(2048)))
    report_sha256: str | None = Field(default=None, sa_column=Column(String(64)))
    report_size: int | None = Field(default=None, sa_column=Column(Integer))
    event_id: str | None = Field(default=None, sa_column=Column(String(36)))
    # The ModelDeployed that caused a candidate run: a *new* one may retry a failed run.
    cause_event_id: str | None = Field(default=None, sa_column=Column(String(36)))
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
