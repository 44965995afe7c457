"""The engine the repositories share, and how SQLite gets its write transactions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

#: the execution option that marks a write transaction (SQLite: BEGIN IMMEDIATE)
WRITE = "airoboros_write"


def normalize_url(url: str) -> str:
    """Accept plain sqlite:// and postgresql:// URLs and pick the async driver."""
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url[len("sqlite:///") :]
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+asyncpg://" + url.split("://", 1)[1]
    return url


def dialect_of(url: str) -> str:
    return url.split(":", 1)[0].split("+", 1)[0]


def sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()
    # The driver would BEGIN only before the first write, after the reads it depends
    # on; sqlite_begin emits BEGIN itself instead.
    dbapi_conn.isolation_level = None


def sqlite_begin(conn: Connection) -> None:
    # A write transaction takes the write lock first (waiting for it up to the busy
    # timeout), so what it reads cannot change before it writes; readers are not
    # blocked (WAL).
    immediate = conn.get_execution_options().get(WRITE, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


class Database:
    """The engine the repositories share: a read session, a write transaction."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: AsyncEngine | None = None
        self._sessions: async_sessionmaker[AsyncSession] | None = None

    @property
    def dialect(self) -> str:
        return dialect_of(self.url)

    def open(self) -> None:
        engine = create_async_engine(self.url, pool_pre_ping=True)
        if self.dialect == "sqlite":
            sync_engine: Engine = engine.sync_engine
            event.listen(sync_engine, "connect", sqlite_connect)
            event.listen(sync_engine, "begin", sqlite_begin)
        self.engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)

    async def dispose(self) -> None:
        if self.engine is not None:
            await self.engine.dispose()
            self.engine = None

    def session(self) -> AsyncSession:
        """A session for reading (its transaction is rolled back when it closes)."""
        if self._sessions is None:
            raise RuntimeError("SqlStore.connect() was not called")
        return self._sessions()

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """A session in a write transaction, committed when the block ends normally."""
        async with self.session() as s, s.begin():
            if self.dialect == "sqlite":
                await s.connection(execution_options={WRITE: True})
            yield s
