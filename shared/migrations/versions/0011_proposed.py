"""Each instructor counts the candidates its step 1 proposed (the quality report's
funnel: proposed, then duplicates, withheld, filtered, kept).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instructor_stats") as batch:
        batch.add_column(sa.Column("proposed", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("instructor_stats") as batch:
        batch.drop_column("proposed")
