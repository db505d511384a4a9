"""ingest: dataset versions and the harvest cursor

Revision ID: ingest_0001
Revises:
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from shared.db import UTCDateTime

revision: str = "ingest_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = ("ingest",)
depends_on: str | Sequence[str] | None = "0002"


def upgrade() -> None:
    op.create_table(
        "ingest_dataset_versions",
        sa.Column("dataset_id", sa.String(64), primary_key=True),
        sa.Column("dataset_name", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("previous_dataset_id", sa.String(64)),
        sa.Column("origin", sa.String(20), nullable=False),
        sa.Column("run_id", sa.String(200), nullable=False),
        sa.Column("event_id", sa.String(36), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("train_count", sa.Integer, nullable=False),
        sa.Column("validation_count", sa.Integer, nullable=False),
        sa.Column("artifacts", sa.Text, nullable=False),
        sa.Column("report_uri", sa.String(2048), nullable=False),
        sa.UniqueConstraint("dataset_name", "version", name="uq_ingest_dataset_line_version"),
    )
    op.create_table(
        "ingest_harvest_cursors",
        sa.Column("dataset_name", sa.String(200), primary_key=True),
        sa.Column("last_created_at", UTCDateTime()),
        sa.Column("last_id", sa.String(64)),
        sa.Column("generation", sa.Integer, nullable=False, server_default="0"),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("ingest_harvest_cursors")
    op.drop_table("ingest_dataset_versions")
