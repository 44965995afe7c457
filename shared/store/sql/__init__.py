"""SqlStore: the SQL adapter of the store's ports (airoboros.store.ports), SQLite via
aiosqlite and PostgreSQL via asyncpg, one engine shared by its repositories.

Each repository method is one transaction. Writers of one instructor's count are
serialised: on PostgreSQL by locking its progress row (``FOR UPDATE``), on SQLite by
taking the database's write lock when the transaction begins (``BEGIN IMMEDIATE``;
SQLite's default, deferred transactions would read a count, then wait for the lock
and write a stale one). So rows are inserted idempotently (one per ``source_id``) and
never beyond an instructor's target, even with concurrent writers.
"""

from __future__ import annotations

import asyncio

from sqlalchemy import text

from airoboros.errors import StoreError
from airoboros.store.ports import (
    AdapterRegistry,
    ArtifactRepository,
    BatchRepository,
    DeadLetterRepository,
    JobRepository,
    ProgressRepository,
    RowRepository,
    UploadRepository,
    VectorRepository,
)
from airoboros.store.sql.artifacts import SqlArtifacts
from airoboros.store.sql.batches import SqlBatches
from airoboros.store.sql.dead_letters import SqlDeadLetters
from airoboros.store.sql.engine import Database, normalize_url
from airoboros.store.sql.jobs import SqlJobs, SqlUploads
from airoboros.store.sql.progress import SqlProgress
from airoboros.store.sql.registry import SqlAdapterRegistry
from airoboros.store.sql.rows import SqlRows
from airoboros.store.sql.vectors import SqlVectors


class SqlStore:
    """The SQL store (``airoboros.store.ports.Store``): every repository over one
    engine. Nothing connects before ``connect``."""

    def __init__(self, url: str) -> None:
        self._db = Database(normalize_url(url))
        self.jobs: JobRepository = SqlJobs(self._db)
        self.uploads: UploadRepository = SqlUploads(self._db)
        self.progress: ProgressRepository = SqlProgress(self._db)
        self.rows: RowRepository = SqlRows(self._db)
        self.artifacts: ArtifactRepository = SqlArtifacts(self._db)
        self.registry: AdapterRegistry = SqlAdapterRegistry(self._db)
        self.vectors: VectorRepository = SqlVectors(self._db)
        self.dead_letters: DeadLetterRepository = SqlDeadLetters(self._db)
        self.batches: BatchRepository = SqlBatches(self._db)

    @property
    def url(self) -> str:
        return self._db.url

    @url.setter
    def url(self, url: str) -> None:
        """Point a closed store at another database (its next ``connect`` opens it)."""
        self._db.url = normalize_url(url)

    @property
    def dialect(self) -> str:
        return self._db.dialect

    async def connect(self, *, migrate: bool = True) -> None:
        """Open the pool; with ``migrate`` (the embedded default) run pending migrations."""
        if migrate:
            from airoboros.migrations import upgrade

            try:
                await asyncio.to_thread(upgrade, self.url)
            except Exception as exc:
                raise StoreError(
                    f"could not migrate the database at {self._safe_url()}: {exc}"
                ) from exc
        self._db.open()

    def _safe_url(self) -> str:
        if "@" in self.url:
            scheme, rest = self.url.split("://", 1)
            return f"{scheme}://***@{rest.split('@', 1)[1]}"
        return self.url

    async def close(self) -> None:
        await self._db.dispose()

    async def ping(self) -> bool:
        """Whether the database answers a trivial query within two seconds."""
        try:
            async with asyncio.timeout(2.0), self._db.session() as s:
                await s.execute(text("SELECT 1"))
            return True
        except Exception:
            return False


# --- jobs ---------------------------------------------------------------------------------


__all__ = ["SqlStore", "normalize_url"]
