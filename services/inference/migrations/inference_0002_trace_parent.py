"""inference: the trace context of the event that created a deployment

A deployment whose start a crash interrupted is finished by the restarted service, outside
any handler: it continues the run's trace from this column.

Revision ID: inference_0002
Revises: inference_0001
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "inference_0002"
down_revision: str | None = "inference_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("inference_deployments") as batch:
        batch.add_column(sa.Column("trace_parent", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("inference_deployments") as batch:
        batch.drop_column("trace_parent")
