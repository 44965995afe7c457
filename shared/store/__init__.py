"""The SQL store (the source of truth): its ports (``airoboros.store.ports``: jobs,
uploads, progress, rows, artifacts, the adapter registry, dedupe vectors, dead letters)
and their SQL adapter (SQLite or PostgreSQL)."""

from airoboros.store.ports import (
    AdapterInfo,
    AdapterRegistry,
    ArtifactRepository,
    BatchRepository,
    DeadLetterRepository,
    Flight,
    InstructorStats,
    JobRecord,
    JobRepository,
    PendingCall,
    ProgressRepository,
    ReadyCommand,
    RowRepository,
    Store,
    StoredItem,
    Submission,
    UploadRepository,
    VectorRepository,
)
from airoboros.store.sql import SqlStore


def make_store(url: str) -> Store:
    """The store at ``url`` (``sqlite:///...`` or ``postgresql://...``), not connected."""
    return SqlStore(url)


__all__ = [
    "AdapterInfo",
    "AdapterRegistry",
    "ArtifactRepository",
    "BatchRepository",
    "DeadLetterRepository",
    "Flight",
    "InstructorStats",
    "JobRecord",
    "JobRepository",
    "PendingCall",
    "ProgressRepository",
    "ReadyCommand",
    "RowRepository",
    "SqlStore",
    "Store",
    "StoredItem",
    "Submission",
    "UploadRepository",
    "VectorRepository",
    "make_store",
]
