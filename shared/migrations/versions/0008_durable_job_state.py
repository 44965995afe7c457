"""All of a job's state is durable: the budget stop a batch met, and each instructor's
cursor (how far the documents deck has been dealt).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        # Why the budget stopped a batch (the meter refused a call), until a resume.
        batch.add_column(sa.Column("budget_note", sa.Text(), nullable=True))
    with op.batch_alter_table("instructor_stats") as batch:
        # Places dealt from the instructor's deck of material (documents' passages).
        batch.add_column(
            sa.Column("cursor", sa.Integer(), nullable=False, server_default=sa.text("0"))
        )


def downgrade() -> None:
    with op.batch_alter_table("instructor_stats") as batch:
        batch.drop_column("cursor")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("budget_note")
