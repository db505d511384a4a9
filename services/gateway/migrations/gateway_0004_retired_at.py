"""gateway: when inference retired a deployment's engine (DeploymentRetired)

Revision ID: gateway_0004
Revises: gateway_0003
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from shared.db import UTCDateTime

revision: str = "gateway_0004"
down_revision: str | None = "gateway_0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("gateway_deployments") as batch:
        batch.add_column(sa.Column("retired_at", UTCDateTime()))


def downgrade() -> None:
    with op.batch_alter_table("gateway_deployments") as batch:
        batch.drop_column("retired_at")
