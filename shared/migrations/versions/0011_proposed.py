"""Each instructor counts the candidates its step 1 proposed (the quality report's
funnel: proposed, then duplicates, withheld, filtered, kept).

Revision ID: 0011
Revises: 0009
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
# 0010 is the batch lane's (issue 15, branch i15-batch); whichever lands second revises
# the other.
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instructor_stats") as batch:
        batch.add_column(sa.Column("proposed", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("instructor_stats") as batch:
        batch.drop_column("proposed")
