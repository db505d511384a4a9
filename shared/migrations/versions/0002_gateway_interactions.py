"""interactions: the gateway writes them, ingest's harvester reads them

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from shared.db import UTCDateTime

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "gateway_interactions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("served_model_name", sa.String(200), nullable=False),
        sa.Column("deployment_id", sa.String(200), nullable=False),
        sa.Column("model_id", sa.String(200)),
        sa.Column("api_key_id", sa.String(100)),
        sa.Column("user_hash", sa.String(64)),
        sa.Column("endpoint", sa.String(20), nullable=False),
        sa.Column("request", sa.Text, nullable=False),
        sa.Column("response_text", sa.Text, nullable=False),
        sa.Column("status_code", sa.Integer, nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("prompt_tokens", sa.Integer),
        sa.Column("completion_tokens", sa.Integer),
        sa.Column("quality_score", sa.Float),
        sa.Column("feedback_rating", sa.Integer),
        sa.Column("feedback_comment", sa.Text),
        sa.Column("feedback_at", UTCDateTime()),
        sa.Column("trace_id", sa.String(32)),
    )
    op.create_index("ix_gateway_interactions_created", "gateway_interactions", ["created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_gateway_interactions_created", table_name="gateway_interactions")
    op.drop_table("gateway_interactions")
