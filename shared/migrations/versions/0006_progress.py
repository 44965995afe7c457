"""Per-item outcomes, streaks instead of a barren-batch counter, reservations in the count.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_INTS = (
    "refused",
    "unparseable",
    "truncated",
    "withheld",
    "retries",
    "asked",
    "fail_streak",
    "dup_streak",
)


def upgrade() -> None:
    with op.batch_alter_table("instructor_stats") as batch:
        for name in _INTS:
            batch.add_column(sa.Column(name, sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("wasted_tokens", sa.Float(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("last_failure", sa.Text(), nullable=True))
        batch.add_column(sa.Column("skipped", sa.Text(), nullable=True))
        # A count of barren batches kept across runs stopped categories for good; the
        # streaks above are reset whenever a job is resumed.
        batch.drop_column("barren")
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("asked", sa.Integer(), nullable=False, server_default="0"))
        # Room in the count held for the task's response step (NULL: not screened yet).
        batch.add_column(sa.Column("reserved", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("reserved")
        batch.drop_column("asked")
    with op.batch_alter_table("instructor_stats") as batch:
        batch.add_column(sa.Column("barren", sa.Integer(), nullable=False, server_default="0"))
        for name in ("skipped", "last_failure", "wasted_tokens", *_INTS):
            batch.drop_column(name)
