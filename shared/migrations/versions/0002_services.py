"""Tasks in flight, processed message ids, dedupe vectors, dead letters, job leases.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_STAT_COLUMNS = ("batches", "rows_from_batches", "dropped", "barren")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("lease_owner", sa.String(128), nullable=True))
        batch.add_column(sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("export_uri", sa.Text(), nullable=True))
        batch.add_column(sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("instructor_stats") as batch:
        for name in _STAT_COLUMNS:
            batch.add_column(sa.Column(name, sa.Integer(), nullable=False, server_default="0"))
    op.create_table(
        "tasks",
        sa.Column("task_id", sa.String(64), primary_key=True),
        sa.Column(
            "job_id", sa.String(64), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("instructor", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="in_flight"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_tasks_job_id", "tasks", ["job_id"])
    op.create_table(
        "processed_messages",
        sa.Column("message_id", sa.String(64), primary_key=True),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_processed_messages_job_id", "processed_messages", ["job_id"])
    op.create_table(
        "dedupe_vectors",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.UniqueConstraint("job_id", "key", name="uq_dedupe_job_key"),
    )
    op.create_index("ix_dedupe_vectors_job_id", "dedupe_vectors", ["job_id"])
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(64), nullable=True),
        sa.Column("queue", sa.String(255), nullable=False),
        sa.Column("message_id", sa.String(64), nullable=True),
        sa.Column("kind", sa.String(64), nullable=True),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_dead_letters_job_id", "dead_letters", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_dead_letters_job_id", table_name="dead_letters")
    op.drop_table("dead_letters")
    op.drop_index("ix_dedupe_vectors_job_id", table_name="dedupe_vectors")
    op.drop_table("dedupe_vectors")
    op.drop_index("ix_processed_messages_job_id", table_name="processed_messages")
    op.drop_table("processed_messages")
    op.drop_index("ix_tasks_job_id", table_name="tasks")
    op.drop_table("tasks")
    with op.batch_alter_table("instructor_stats") as batch:
        for name in _STAT_COLUMNS:
            batch.drop_column(name)
    with op.batch_alter_table("jobs") as batch:
        for name in ("finished_at", "export_uri", "lease_until", "lease_owner", "cancel_requested"):
            batch.drop_column(name)
