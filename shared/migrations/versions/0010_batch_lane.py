"""The Batch API lane: calls sent through it, commands waiting for their answers, and the
batch jobs submitted (ids, file ids, states), so a restart never submits one twice.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def _job_fk() -> sa.ForeignKey:
    return sa.ForeignKey("jobs.id", ondelete="CASCADE")


def upgrade() -> None:
    op.create_table(
        "batch_calls",
        sa.Column("job_id", sa.String(64), _job_fk(), primary_key=True),
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("instructor", sa.String(64), nullable=False),
        sa.Column("task_id", sa.String(64), nullable=True),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("cost", sa.Float(), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("submission_id", sa.String(64), nullable=True),
        sa.Column("answer", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_batch_calls_state", "batch_calls", ["state"])
    op.create_index("ix_batch_calls_submission_id", "batch_calls", ["submission_id"])
    op.create_table(
        "batch_commands",
        sa.Column("job_id", sa.String(64), _job_fk(), primary_key=True),
        sa.Column("command_id", sa.String(64), primary_key=True),
        sa.Column("task_id", sa.String(64), nullable=False),
        sa.Column("instructor", sa.String(64), nullable=False),
        sa.Column("command", sa.Text(), nullable=False),
        sa.Column("keys", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_batch_commands_task_id", "batch_commands", ["task_id"])
    op.create_table(
        "batch_submissions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("job_id", sa.String(64), _job_fk(), nullable=False),
        sa.Column("instructor", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("batch_id", sa.String(128), nullable=True),
        sa.Column("input_file_id", sa.String(128), nullable=True),
        sa.Column("output_file_id", sa.String(128), nullable=True),
        sa.Column("error_file_id", sa.String(128), nullable=True),
        sa.Column("reserved_cost", sa.Float(), nullable=False),
        sa.Column("reserved_tokens", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_batch_submissions_job_id", "batch_submissions", ["job_id"])


def downgrade() -> None:
    op.drop_table("batch_submissions")
    op.drop_table("batch_commands")
    op.drop_table("batch_calls")
