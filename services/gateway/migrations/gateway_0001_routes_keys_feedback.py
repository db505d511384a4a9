"""gateway: deployments with rollout state, API keys, feedback

Revision ID: gateway_0001
Revises:
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from shared.db import UTCDateTime

revision: str = "gateway_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = ("gateway",)
depends_on: str | Sequence[str] | None = "0002"


def upgrade() -> None:
    op.create_table(
        "gateway_deployments",
        sa.Column("deployment_id", sa.String(200), primary_key=True),
        sa.Column("served_model_name", sa.String(200), nullable=False),
        sa.Column("model_id", sa.String(200), nullable=False),
        sa.Column("endpoint", sa.String(2048), nullable=False),
        sa.Column("engine", sa.String(50), nullable=False),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("run_id", sa.String(200), nullable=False),
        sa.Column("cause_event_id", sa.String(36)),
        sa.Column("upstream_model", sa.String(2048)),
        sa.Column("max_context_tokens", sa.Integer),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("weight", sa.Float, nullable=False, server_default="0"),
        sa.Column("step", sa.Integer, nullable=False, server_default="0"),
        sa.Column("step_started_at", UTCDateTime()),
        sa.Column("auto", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("pinned", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("reason", sa.Text, nullable=False, server_default=""),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )
    op.create_index(
        "ix_gateway_deployments_model", "gateway_deployments", ["served_model_name", "state"]
    )
    op.create_table(
        "gateway_api_keys",
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("name", sa.String(200), nullable=False, server_default=""),
        sa.Column("scopes", sa.String(200), nullable=False),
        sa.Column("models", sa.Text),
        sa.Column("rpm", sa.Integer),
        sa.Column("tpm", sa.Integer),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("revoked_at", UTCDateTime()),
    )
    op.create_table(
        "gateway_feedback",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("response_id", sa.String(64), nullable=False),
        sa.Column("api_key_id", sa.String(100)),
        sa.Column("rating", sa.Integer, nullable=False),
        sa.Column("correction", sa.Text),
        sa.Column("comment", sa.Text),
        sa.Column("applied", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_gateway_feedback_response_id", "gateway_feedback", ["response_id"])


def downgrade() -> None:
    op.drop_index("ix_gateway_feedback_response_id", table_name="gateway_feedback")
    op.drop_table("gateway_feedback")
    op.drop_table("gateway_api_keys")
    op.drop_index("ix_gateway_deployments_model", table_name="gateway_deployments")
    op.drop_table("gateway_deployments")
