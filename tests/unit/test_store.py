"""What only the SQL adapter does, beside the store's contract suite
(tests/contract/test_store_contract.py, which holds every repository to its port on
SQLite and PostgreSQL): the driver URL, and airoboros.migrations on SQLite (and
PostgreSQL)."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from airoboros.contracts import Item
from airoboros.migrations import downgrade, upgrade
from airoboros.store import SqlStore

PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
TABLES = {"jobs", "instructor_stats", "items"}


def item(n: int, category: str = "general") -> Item:
    return Item(instruction=f"  question {n}  ", response=f"answer {n}\n", category=category)


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'store.sqlite'}"


def sqlite_tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
    return {r[0] for r in rows}


# --- SQLite --------------------------------------------------------------------------------


async def test_connect_runs_migrations(tmp_path: Path) -> None:
    s = SqlStore(f"sqlite:///{tmp_path / 'fresh.sqlite'}")  # plain URL is accepted too
    assert s.url.startswith("sqlite+aiosqlite:///")
    await s.connect()
    try:
        assert sqlite_tables(tmp_path / "fresh.sqlite") >= TABLES
        assert "alembic_version" in sqlite_tables(tmp_path / "fresh.sqlite")
    finally:
        await s.close()
    # Connecting again (migrations already at head) is harmless.
    s2 = SqlStore(f"sqlite:///{tmp_path / 'fresh.sqlite'}")
    await s2.connect()
    await s2.close()


def test_sqlite_downgrade_to_base_then_upgrade(tmp_path: Path) -> None:
    db = tmp_path / "mig.sqlite"
    url = f"sqlite+aiosqlite:///{db}"
    upgrade(url)
    assert sqlite_tables(db) >= TABLES
    downgrade(url, "base")
    assert not (TABLES & sqlite_tables(db))
    upgrade(url)
    assert sqlite_tables(db) >= TABLES


async def test_store_works_after_downgrade_and_upgrade(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    s = SqlStore(url)
    await s.connect()
    await s.jobs.ensure("j", config={}, targets={"general": 2})
    await s.rows.add("j", [("s:0", item(0))])
    await s.close()
    await asyncio.to_thread(downgrade, url, "base")
    await asyncio.to_thread(upgrade, url)
    s = SqlStore(url)
    await s.connect()
    try:
        assert not await s.jobs.exists("j")  # the data went with the tables
        await s.jobs.ensure("j", config={}, targets={"general": 2})
        assert len(await s.rows.add("j", [("s:0", item(0))])) == 1
    finally:
        await s.close()


# --- PostgreSQL ----------------------------------------------------------------------------


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    asyncpg = pytest.importorskip("asyncpg")
    name = f"airoboros_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"PostgreSQL not reachable on 127.0.0.1:5432: {exc}")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield PG_URL.format(name=name)
    finally:
        admin = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def pg_tables(url: str) -> set[str]:
    import asyncpg

    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        rows = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
    finally:
        await conn.close()
    return {r["table_name"] for r in rows}


@pytest.mark.postgres
async def test_postgres_connect_runs_migrations(pg_url: str) -> None:
    s = SqlStore(pg_url)
    assert s.dialect == "postgresql"
    await s.connect()
    try:
        assert await pg_tables(pg_url) >= TABLES
        # What the store does on it is the contract suite's (tests/contract).
        await s.jobs.ensure("j", config={"k": 1}, targets={"general": 3})
        assert (await s.jobs.get("j")).config == {"k": 1}
    finally:
        await s.close()


@pytest.mark.postgres
async def test_postgres_downgrade_to_base_then_upgrade(pg_url: str) -> None:
    await asyncio.to_thread(upgrade, pg_url)
    assert await pg_tables(pg_url) >= TABLES
    await asyncio.to_thread(downgrade, pg_url, "base")
    assert not (TABLES & await pg_tables(pg_url))
    await asyncio.to_thread(upgrade, pg_url)
    assert await pg_tables(pg_url) >= TABLES
