"""The SQL store: jobs, per-instructor progress and dataset rows (SQLAlchemy 2, async)."""

from airoboros.store.sql import InstructorStats, JobRecord, SqlStore, StoredItem

__all__ = ["InstructorStats", "JobRecord", "SqlStore", "StoredItem"]
