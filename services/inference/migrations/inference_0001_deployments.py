"""inference: deployments

Revision ID: inference_0001
Revises:
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from shared.db import UTCDateTime

revision: str = "inference_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = ("inference",)
depends_on: str | Sequence[str] | None = "0002"


def upgrade() -> None:
    op.create_table(
        "inference_deployments",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("dedupe_key", sa.String(255), nullable=False),
        sa.Column("run_id", sa.String(200), nullable=False),
        sa.Column("source_event_id", sa.String(36)),
        sa.Column("model_id", sa.String(200), nullable=False),
        sa.Column("adapter_id", sa.String(200)),
        sa.Column("dataset_id", sa.String(200)),
        sa.Column("base_model", sa.String(500), nullable=False),
        sa.Column("format", sa.String(32), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("served_model_name", sa.String(200), nullable=False),
        sa.Column("upstream_name", sa.String(200), nullable=False),
        sa.Column("engine", sa.String(32), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("profile", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("stable_rank", sa.Integer),
        sa.Column("host_deployment_id", sa.String(64)),
        sa.Column("artifact_uri", sa.String(2048)),
        sa.Column("artifact_sha256", sa.String(64)),
        sa.Column("artifact_size", sa.Integer),
        sa.Column("validation_json", sa.Text),
        sa.Column("model_path", sa.String(2048)),
        sa.Column("endpoint", sa.String(2048)),
        sa.Column("port", sa.Integer),
        sa.Column("pid", sa.Integer),
        sa.Column("k8s_name", sa.String(63)),
        sa.Column("log_path", sa.String(2048)),
        sa.Column("log_uri", sa.String(2048)),
        sa.Column("reason", sa.Text),
        sa.Column("fetch_s", sa.Float),
        sa.Column("start_s", sa.Float),
        sa.Column("ready_s", sa.Float),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("ready_at", UTCDateTime()),
        sa.UniqueConstraint("dedupe_key", name="uq_inference_deployments_dedupe"),
    )
    op.create_index(
        "ix_inference_deployments_line",
        "inference_deployments",
        ["served_model_name", "status"],
    )


def downgrade() -> None:
    op.drop_index("ix_inference_deployments_line", table_name="inference_deployments")
    op.drop_table("inference_deployments")
