"""ingest: the harvester also follows late feedback (a second cursor, over feedback_at)

Revision ID: ingest_0002
Revises: ingest_0001
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from shared.db import UTCDateTime

revision: str = "ingest_0002"
down_revision: str | None = "ingest_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("ingest_harvest_cursors", sa.Column("feedback_after", UTCDateTime()))


def downgrade() -> None:
    with op.batch_alter_table("ingest_harvest_cursors") as batch:
        batch.drop_column("feedback_after")
