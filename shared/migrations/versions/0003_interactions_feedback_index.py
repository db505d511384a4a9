"""interactions: index on feedback_at (the harvester's late-feedback cursor)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_gateway_interactions_feedback", "gateway_interactions", ["feedback_at", "id"]
    )


def downgrade() -> None:
    op.drop_index("ix_gateway_interactions_feedback", table_name="gateway_interactions")
