"""The SQL store (the source of truth): jobs, rows, progress, artifacts, the adapter registry."""

from airoboros.store.sql import AdapterInfo, InstructorStats, JobRecord, SqlStore, StoredItem

__all__ = ["AdapterInfo", "InstructorStats", "JobRecord", "SqlStore", "StoredItem"]
