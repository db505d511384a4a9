"""The gateway's tables: deployments with their rollout state, API keys, feedback.

Route state lives here (not only in memory) so it survives a restart and every replica
converges on it. ``gateway_interactions`` is :class:`shared.interactions.Interaction`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from sqlalchemy import Boolean, Column, Float, Index, Integer, String, Text
from sqlmodel import Field, SQLModel

from shared.db import UTCDateTime

# pending: deployed, waiting for its evaluation; canary: receiving `weight` of traffic;
# stable: serving the rest; previous: a former stable kept for instant manual rollback;
# rolled_back / refused: never routed to again unless an admin promotes it;
# retired: inference released its engine (DeploymentRetired): never routed to again.
DeploymentState = Literal[
    "pending", "canary", "stable", "previous", "rolled_back", "refused", "retired"
]


class GatewayDeployment(SQLModel, table=True):
    __tablename__ = "gateway_deployments"
    __table_args__ = (Index("ix_gateway_deployments_model", "served_model_name", "state"),)

    deployment_id: str = Field(sa_column=Column(String(200), primary_key=True))
    served_model_name: str = Field(sa_column=Column(String(200), nullable=False))
    model_id: str = Field(sa_column=Column(String(200), nullable=False))
    endpoint: str = Field(sa_column=Column(String(2048), nullable=False))
    engine: str = Field(sa_column=Column(String(50), nullable=False))
    role: str = Field(sa_column=Column(String(20), nullable=False))  # baseline | candidate
    run_id: str = Field(sa_column=Column(String(200), nullable=False))
    # The event that caused the last change (lineage for the next RolloutChanged).
    cause_event_id: str | None = Field(default=None, sa_column=Column(String(36)))
    # Its W3C traceparent: decisions taken later from live stats continue the run's trace.
    trace_parent: str | None = Field(default=None, sa_column=Column(String(64)))
    # The model name the upstream itself serves (None: the served_model_name).
    upstream_model: str | None = Field(default=None, sa_column=Column(String(2048)))
    max_context_tokens: int | None = Field(default=None, sa_column=Column(Integer))
    state: str = Field(sa_column=Column(String(20), nullable=False))
    weight: float = Field(default=0.0, sa_column=Column(Float, nullable=False))
    step: int = Field(default=0, sa_column=Column(Integer, nullable=False))
    step_started_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime()))
    # Automatic advancing (an admin setting a weight by hand turns it off; rollback stays on).
    auto: bool = Field(default=True, sa_column=Column(Boolean, nullable=False))
    pinned: bool = Field(default=False, sa_column=Column(Boolean, nullable=False))
    reason: str = Field(default="", sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    updated_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    # When inference announced that the engine is gone. Set on a stable too, which keeps its
    # state (there is nothing to fall back to) but is never made "previous" again.
    retired_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime()))


class GatewayApiKey(SQLModel, table=True):
    __tablename__ = "gateway_api_keys"

    key_id: str = Field(sa_column=Column(String(32), primary_key=True))
    # sha256 of the whole key; the key itself is shown once, at creation.
    key_hash: str = Field(sa_column=Column(String(64), nullable=False, unique=True))
    name: str = Field(default="", sa_column=Column(String(200), nullable=False))
    scopes: str = Field(sa_column=Column(String(200), nullable=False))  # "client,admin"
    models: str | None = Field(default=None, sa_column=Column(Text))  # JSON list or None = all
    rpm: int | None = Field(default=None, sa_column=Column(Integer))
    tpm: int | None = Field(default=None, sa_column=Column(Integer))
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    updated_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    revoked_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime()))


class GatewayFeedback(SQLModel, table=True):
    __tablename__ = "gateway_feedback"

    id: int | None = Field(default=None, sa_column=Column(Integer, primary_key=True))
    response_id: str = Field(sa_column=Column(String(64), nullable=False))
    api_key_id: str | None = Field(default=None, sa_column=Column(String(100)))
    rating: int = Field(sa_column=Column(Integer, nullable=False))
    correction: str | None = Field(default=None, sa_column=Column(Text))
    comment: str | None = Field(default=None, sa_column=Column(Text))
    applied: bool = Field(default=False, sa_column=Column(Boolean, nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


class GatewayReplicaStats(SQLModel, table=True):
    """Each replica's live window per deployment (step -1 = stable's rolling window), so the
    canary is judged on all replicas' traffic and every replica's admin view agrees."""

    __tablename__ = "gateway_replica_stats"

    replica_id: str = Field(sa_column=Column(String(32), primary_key=True))
    deployment_id: str = Field(sa_column=Column(String(200), primary_key=True))
    step: int = Field(sa_column=Column(Integer, primary_key=True))
    requests: int = Field(sa_column=Column(Integer, nullable=False))
    errors: int = Field(sa_column=Column(Integer, nullable=False))
    p50_ms: float | None = Field(default=None, sa_column=Column(Float))
    p95_ms: float | None = Field(default=None, sa_column=Column(Float))
    p95_low_ms: float | None = Field(default=None, sa_column=Column(Float))
    latency_samples: int = Field(sa_column=Column(Integer, nullable=False))
    updated_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
