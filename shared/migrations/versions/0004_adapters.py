"""The adapter registry.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "adapters",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("expert", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("base_model", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="training"),
        sa.Column("job_id", sa.String(64), nullable=True),
        sa.Column("dataset_uri", sa.Text(), nullable=True),
        sa.Column("uri", sa.Text(), nullable=True),
        sa.Column("metrics", sa.Text(), nullable=False, server_default="{}"),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("expert", "version", name="uq_adapters_expert_version"),
    )
    op.create_index("ix_adapters_expert", "adapters", ["expert"])
    op.create_index("ix_adapters_job_id", "adapters", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_adapters_job_id", table_name="adapters")
    op.drop_index("ix_adapters_expert", table_name="adapters")
    op.drop_table("adapters")
