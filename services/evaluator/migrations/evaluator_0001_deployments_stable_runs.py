"""evaluator: deployments seen, stable deployment per served model name, benchmark runs

Revision ID: evaluator_0001
Revises:
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from shared.db import UTCDateTime

revision: str = "evaluator_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = ("evaluator",)
depends_on: str | Sequence[str] | None = "0002"


def upgrade() -> None:
    op.create_table(
        "evaluator_deployments",
        sa.Column("deployment_id", sa.String(200), primary_key=True),
        sa.Column("model_id", sa.String(200), nullable=False),
        sa.Column("served_model_name", sa.String(200), nullable=False),
        sa.Column("endpoint", sa.String(2048), nullable=False),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("engine", sa.String(20), nullable=False),
        sa.Column("deployed_at", UTCDateTime(), nullable=False),
    )
    op.create_index(
        "ix_evaluator_deployments_served_model_name",
        "evaluator_deployments",
        ["served_model_name"],
    )
    op.create_table(
        "evaluator_stable",
        sa.Column("served_model_name", sa.String(200), primary_key=True),
        sa.Column("deployment_id", sa.String(200), nullable=False),
        sa.Column("source", sa.String(20), nullable=False),
        sa.Column("since", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "evaluator_runs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("deployment_id", sa.String(200), nullable=False),
        sa.Column("benchmark", sa.String(200), nullable=False),
        sa.Column("benchmark_version", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("passed", sa.Boolean),
        sa.Column("overall_score", sa.Float),
        sa.Column("summary", sa.Text, nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("report_uri", sa.String(2048)),
        sa.Column("report_sha256", sa.String(64)),
        sa.Column("report_size", sa.Integer),
        sa.Column("event_id", sa.String(36)),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.UniqueConstraint("deployment_id", "benchmark_version", name="uq_evaluator_runs_dep_ver"),
    )


def downgrade() -> None:
    op.drop_table("evaluator_runs")
    op.drop_table("evaluator_stable")
    op.drop_index("ix_evaluator_deployments_served_model_name", "evaluator_deployments")
    op.drop_table("evaluator_deployments")
