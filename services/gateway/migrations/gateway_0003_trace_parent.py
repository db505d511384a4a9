"""gateway: the trace context of the event behind a deployment's last change

Revision ID: gateway_0003
Revises: gateway_0002
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "gateway_0003"
down_revision: str | None = "gateway_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("gateway_deployments") as batch:
        batch.add_column(sa.Column("trace_parent", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("gateway_deployments") as batch:
        batch.drop_column("trace_parent")
