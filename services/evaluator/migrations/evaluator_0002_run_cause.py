"""evaluator: the ModelDeployed event that caused each run

Revision ID: evaluator_0002
Revises: evaluator_0001
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "evaluator_0002"
down_revision: str | None = "evaluator_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("evaluator_runs") as batch:
        batch.add_column(sa.Column("cause_event_id", sa.String(36)))


def downgrade() -> None:
    with op.batch_alter_table("evaluator_runs") as batch:
        batch.drop_column("cause_event_id")
