"""quantizer: one row per (adapter, target)

Revision ID: quantizer_0001
Revises:
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from shared.db import UTCDateTime

revision: str = "quantizer_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = ("quantizer",)
depends_on: str | Sequence[str] | None = "0002"


def upgrade() -> None:
    op.create_table(
        "quantizer_models",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("model_id", sa.String(200), nullable=False),
        sa.Column("adapter_id", sa.String(200), nullable=False),
        sa.Column("format", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("run_id", sa.String(200), nullable=False),
        sa.Column("training_event_id", sa.String(36), nullable=False),
        sa.Column("base_model", sa.String(500), nullable=False),
        sa.Column("dataset_id", sa.String(200)),
        sa.Column("artifact_uri", sa.String(2048)),
        sa.Column("artifact_sha256", sa.String(64)),
        sa.Column("size_bytes", sa.BigInteger),
        sa.Column("perplexity_before", sa.Float),
        sa.Column("perplexity_after", sa.Float),
        sa.Column("relative_increase", sa.Float),
        sa.Column("seconds", sa.Float),
        sa.Column("reason", sa.Text),
        sa.Column("report_uri", sa.String(2048)),
        sa.Column("event_id", sa.String(36), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.UniqueConstraint("adapter_id", "format", name="uq_quantizer_adapter_format"),
    )
    op.create_index("ix_quantizer_models_model_id", "quantizer_models", ["model_id"])


def downgrade() -> None:
    op.drop_index("ix_quantizer_models_model_id", table_name="quantizer_models")
    op.drop_table("quantizer_models")
