"""The SQL store (the source of truth): jobs, rows, progress, artifacts, the adapter registry."""

from airoboros.store.sql import (
    AdapterInfo,
    Flight,
    InstructorStats,
    JobRecord,
    SqlStore,
    StoredItem,
)

__all__ = ["AdapterInfo", "Flight", "InstructorStats", "JobRecord", "SqlStore", "StoredItem"]
