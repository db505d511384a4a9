"""trainer: training jobs (one per adapter id)

Revision ID: trainer_0001
Revises:
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from shared.db import UTCDateTime

revision: str = "trainer_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = ("trainer",)
depends_on: str | Sequence[str] | None = "0002"


def upgrade() -> None:
    op.create_table(
        "trainer_jobs",
        sa.Column("adapter_id", sa.String(64), primary_key=True),
        sa.Column("dataset_id", sa.String(200), nullable=False),
        sa.Column("base_model", sa.String(500), nullable=False),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("config_hash", sa.String(64), nullable=False),
        sa.Column("config_json", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("run_id", sa.String(200), nullable=False),
        sa.Column("event_id", sa.String(36), nullable=False),
        sa.Column("phase", sa.String(50)),
        sa.Column("step", sa.Integer, nullable=False, server_default="0"),
        sa.Column("checkpoint_ref", sa.Text),
        sa.Column("checkpoint_phase", sa.String(50)),
        sa.Column("checkpoint_step", sa.Integer),
        sa.Column("adapter_ref", sa.Text),
        sa.Column("metrics_json", sa.Text),
        sa.Column("reason", sa.Text),
        sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("heartbeat_at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_trainer_jobs_dataset_id", "trainer_jobs", ["dataset_id"])


def downgrade() -> None:
    op.drop_index("ix_trainer_jobs_dataset_id", table_name="trainer_jobs")
    op.drop_table("trainer_jobs")
