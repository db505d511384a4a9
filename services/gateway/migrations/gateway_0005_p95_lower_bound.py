"""gateway: each replica's lower confidence bound of a window's p95 (what the latency SLO judges)

Revision ID: gateway_0005
Revises: gateway_0004
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "gateway_0005"
down_revision: str | None = "gateway_0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("gateway_replica_stats") as batch:
        batch.add_column(sa.Column("p95_low_ms", sa.Float))


def downgrade() -> None:
    with op.batch_alter_table("gateway_replica_stats") as batch:
        batch.drop_column("p95_low_ms")
