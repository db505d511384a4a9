"""ingest: runs of a dataset version, one per training spec (a retrain of the same content)

Revision ID: ingest_0003
Revises: ingest_0002
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from shared.db import UTCDateTime

revision: str = "ingest_0003"
down_revision: str | None = "ingest_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# training_key of "no spec" (sha256 of b"null"): what every earlier version was announced with.
NO_SPEC = "74234e98afe7498fb5daf1f36ac2d78acc339464f950703b8c019892f982b90b"


def upgrade() -> None:
    op.create_table(
        "ingest_dataset_runs",
        sa.Column("dataset_id", sa.String(64), primary_key=True),
        sa.Column("training_key", sa.String(64), primary_key=True),
        sa.Column("run_id", sa.String(200), nullable=False),
        sa.Column("event_id", sa.String(36), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )
    op.execute(
        sa.text(
            "INSERT INTO ingest_dataset_runs "
            "(dataset_id, training_key, run_id, event_id, created_at) "
            "SELECT dataset_id, :key, run_id, event_id, created_at FROM ingest_dataset_versions"
        ).bindparams(key=NO_SPEC)
    )


def downgrade() -> None:
    op.drop_table("ingest_dataset_runs")
