"""The interaction record: the contract between the gateway (which writes it) and ingest's
harvester (which reads it). The table belongs to the gateway; no other service writes it.

One row per completed request through the gateway: what was asked, what was answered, by
which deployment, how fast, and what the user (``feedback_rating``) or an automatic scorer
(``quality_score``, 0..1) thought of it.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, Float, Index, Integer, String, Text
from sqlmodel import Field, SQLModel

from shared.db import UTCDateTime


class Interaction(SQLModel, table=True):
    __tablename__ = "gateway_interactions"
    __table_args__ = (
        Index("ix_gateway_interactions_created", "created_at", "id"),
        Index("ix_gateway_interactions_feedback", "feedback_at", "id"),
    )

    id: str = Field(sa_column=Column(String(64), primary_key=True))  # the response id
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    served_model_name: str = Field(sa_column=Column(String(200), nullable=False))
    deployment_id: str = Field(sa_column=Column(String(200), nullable=False))
    model_id: str | None = Field(default=None, sa_column=Column(String(200)))
    api_key_id: str | None = Field(default=None, sa_column=Column(String(100)))
    # Sticky-routing hash of the user/key, never the raw key.
    user_hash: str | None = Field(default=None, sa_column=Column(String(64)))
    endpoint: str = Field(default="chat", sa_column=Column(String(20), nullable=False))
    # JSON: the request's messages ([{"role", "content"}]) or {"prompt": ...} for completions.
    request: str = Field(sa_column=Column(Text, nullable=False))
    response_text: str = Field(sa_column=Column(Text, nullable=False))
    status_code: int = Field(sa_column=Column(Integer, nullable=False))
    latency_ms: float = Field(sa_column=Column(Float, nullable=False))
    prompt_tokens: int | None = Field(default=None, sa_column=Column(Integer))
    completion_tokens: int | None = Field(default=None, sa_column=Column(Integer))
    quality_score: float | None = Field(default=None, sa_column=Column(Float))
    feedback_rating: int | None = Field(default=None, sa_column=Column(Integer))  # +1 / -1
    feedback_comment: str | None = Field(default=None, sa_column=Column(Text))
    feedback_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime()))
    trace_id: str | None = Field(default=None, sa_column=Column(String(32)))
