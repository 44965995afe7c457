"""Jobs belong to the API key that created them, and may carry their own LLM key.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        # A digest of the creating API key (NULL for jobs made before: admin keys only).
        batch.add_column(sa.Column("owner", sa.String(64), nullable=True))
        # The job's own key for its LLM endpoint, never returned by the API.
        batch.add_column(sa.Column("llm_api_key", sa.Text(), nullable=True))
        # The export of a finished job is retried while the object store is down.
        batch.add_column(
            sa.Column("export_pending", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("export_error", sa.Text(), nullable=True))
        batch.create_index("ix_jobs_owner", ["owner"])
    op.create_table(
        "uploads",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(64), nullable=True, index=True),
        sa.Column("files", sa.Text(), nullable=False, server_default="[]"),
        sa.Column("bytes", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("uploads")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_owner")
        for name in ("export_error", "export_pending", "llm_api_key", "owner"):
            batch.drop_column(name)
