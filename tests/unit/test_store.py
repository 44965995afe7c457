"""airoboros.store.SqlStore and airoboros.migrations on SQLite (and PostgreSQL)."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from airoboros.contracts import Item
from airoboros.errors import NotFoundError
from airoboros.migrations import downgrade, upgrade
from airoboros.store import SqlStore, StoredItem

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


async def collect(it: AsyncIterator[StoredItem]) -> list[StoredItem]:
    return [x async for x in it]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqlStore]:
    s = SqlStore(sqlite_url(tmp_path))
    await s.connect()
    yield s
    await s.close()


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


async def test_store_refuses_use_before_connect(tmp_path: Path) -> None:
    s = SqlStore(sqlite_url(tmp_path))
    with pytest.raises(RuntimeError, match="connect"):
        await s.jobs.get("x")


async def test_ensure_get_and_set_job_status(store: SqlStore) -> None:
    job = await store.jobs.ensure("job1", config={"model": "gpt-4"}, targets={"general": 3})
    assert job.id == "job1"
    assert job.status == "running"
    assert job.config == {"model": "gpt-4"}
    assert await store.jobs.exists("job1")
    assert not await store.jobs.exists("other")

    await store.jobs.set_status("job1", "done", "all rows written")
    got = await store.jobs.get("job1")
    assert (got.status, got.detail) == ("done", "all rows written")

    # ensure_job again updates config and targets, keeps the job.
    again = await store.jobs.ensure("job1", config={"model": "x"}, targets={"general": 7})
    assert again.config == {"model": "x"}
    assert again.status == "done"
    assert (await store.progress.stats("job1"))["general"].target == 7

    with pytest.raises(NotFoundError):
        await store.jobs.get("missing")


async def test_add_items_is_idempotent_by_source_id(store: SqlStore) -> None:
    await store.jobs.ensure("j", config={}, targets={"general": 10})
    first = await store.rows.add("j", [("m1:0", item(0)), ("m1:1", item(1))])
    assert [s.item.instruction for s in first] == ["question 0", "question 1"]  # stripped
    assert first[0].item.response == "answer 0"
    assert first[0].seq < first[1].seq

    # A redelivered message inserts nothing; a new source_id does.
    again = await store.rows.add("j", [("m1:0", item(0)), ("m1:1", item(1)), ("m2:0", item(2))])
    assert [s.item.instruction for s in again] == ["question 2"]
    # Same source_id twice in one call counts once.
    dup = await store.rows.add("j", [("m3:0", item(3)), ("m3:0", item(3))])
    assert len(dup) == 1
    assert await store.rows.count("j") == 4
    assert (await store.progress.stats("j"))["general"].accepted == 4


async def test_add_items_caps_at_the_instructor_target(store: SqlStore) -> None:
    await store.jobs.ensure("j", config={}, targets={"general": 3, "writing": 1})
    got = await store.rows.add(
        "j",
        [(f"a:{i}", item(i)) for i in range(5)] + [("w:0", item(9, "writing"))],
    )
    assert [s.item.instruction for s in got] == [
        "question 0",
        "question 1",
        "question 2",
        "question 9",
    ]
    assert await store.rows.add("j", [("b:0", item(7))]) == []
    stats = await store.progress.stats("j")
    assert stats["general"].accepted == 3
    assert stats["writing"].accepted == 1
    assert await store.rows.count("j") == 4


async def test_add_items_without_cap_ignores_the_target(store: SqlStore) -> None:
    await store.jobs.ensure("j", config={}, targets={"general": 1})
    got = await store.rows.add("j", [(f"a:{i}", item(i)) for i in range(4)], cap=False)
    assert len(got) == 4
    assert await store.rows.count("j") == 4
    # Still idempotent without the cap.
    assert await store.rows.add("j", [("a:0", item(0))], cap=False) == []


async def test_add_items_for_unknown_instructor_with_cap_drops(store: SqlStore) -> None:
    await store.jobs.ensure("j", config={}, targets={"general": 5})
    assert await store.rows.add("j", [("x:0", item(0, "trivia"))]) == []
    assert len(await store.rows.add("j", [("x:0", item(0, "trivia"))], cap=False)) == 1


async def test_iter_items_order_category_and_paging(store: SqlStore) -> None:
    await store.jobs.ensure("j", config={}, targets={"general": 10, "writing": 10})
    cats = ["general", "writing", "general", "general", "writing", "general", "general"]
    rows = [(f"s:{i}", item(i, c)) for i, c in enumerate(cats)]
    inserted = await store.rows.add("j", rows)
    assert len(inserted) == 7

    everything = await collect(store.rows.iterate("j", page_size=2))
    assert [s.item.instruction for s in everything] == [f"question {i}" for i in range(7)]
    assert [s.seq for s in everything] == sorted(s.seq for s in everything)

    general = await collect(store.rows.iterate("j", category="general", page_size=2))
    assert [s.item.instruction for s in general] == [
        f"question {i}" for i, c in enumerate(cats) if c == "general"
    ]
    assert all(s.item.category == "general" for s in general)

    after = await collect(store.rows.iterate("j", after=everything[4].seq, page_size=1))
    assert [s.item.instruction for s in after] == ["question 5", "question 6"]

    # Exactly a multiple of the page size still terminates with everything.
    writing = await collect(store.rows.iterate("j", category="writing", page_size=2))
    assert [s.item.instruction for s in writing] == ["question 1", "question 4"]


async def test_iter_items_is_per_job(store: SqlStore) -> None:
    await store.jobs.ensure("a", config={}, targets={"general": 5})
    await store.jobs.ensure("b", config={}, targets={"general": 5})
    await store.rows.add("a", [("s:0", item(0))])
    # The same source_id in another job is a different row.
    await store.rows.add("b", [("s:0", item(1)), ("s:1", item(2))])
    assert [s.item.instruction for s in await collect(store.rows.iterate("a"))] == ["question 0"]
    assert await store.rows.count("b") == 2


async def test_item_optional_fields_round_trip(store: SqlStore) -> None:
    await store.jobs.ensure("j", config={}, targets={"general": 5})
    it = Item(
        instruction="q",
        response="a",
        category="general",
        system=" sys ",
        skip_prompt_formatting=True,
    )
    await store.rows.add("j", [("s:0", it)])
    [got] = await collect(store.rows.iterate("j"))
    assert got.item.system == "sys"
    assert got.item.skip_prompt_formatting is True


async def test_add_stats_increments(store: SqlStore) -> None:
    await store.jobs.ensure("j", config={}, targets={"general": 5})
    await store.progress.add_stats(
        "j", "general", duplicates=2, filtered=1, cost=0.25, prompt_tokens=100
    )
    await store.progress.add_stats("j", "general", duplicates=3, cost=0.5, requests=1)
    st = (await store.progress.stats("j"))["general"]
    assert st.duplicates == 5
    assert st.filtered == 1
    assert st.requests == 1
    assert st.prompt_tokens == 100
    assert st.cost == pytest.approx(0.75)
    assert st.target == 5

    # An instructor without a progress row gets one.
    await store.progress.add_stats("j", "writing", failures=2)
    assert (await store.progress.stats("j"))["writing"].failures == 2

    with pytest.raises(ValueError, match="unknown stat fields"):
        await store.progress.add_stats("j", "general", accepted=1)


async def test_delete_job_removes_everything(store: SqlStore) -> None:
    await store.jobs.ensure("j", config={}, targets={"general": 5})
    await store.jobs.ensure("keep", config={}, targets={"general": 5})
    await store.rows.add("j", [("s:0", item(0))])
    await store.rows.add("keep", [("s:0", item(0))])
    await store.jobs.delete("j")
    with pytest.raises(NotFoundError):
        await store.jobs.get("j")
    assert await store.rows.count("j") == 0
    assert await store.progress.stats("j") == {}
    assert await store.rows.count("keep") == 1


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
async def test_postgres_migrations_and_add_items(pg_url: str) -> None:
    s = SqlStore(pg_url)
    assert s.dialect == "postgresql"
    await s.connect()
    try:
        assert await pg_tables(pg_url) >= TABLES
        await s.jobs.ensure("j", config={"k": 1}, targets={"general": 3})
        got = await s.rows.add("j", [(f"a:{i}", item(i)) for i in range(5)])
        assert [x.item.instruction for x in got] == ["question 0", "question 1", "question 2"]
        assert await s.rows.add("j", [("a:0", item(0))], cap=False) == []
        assert len(await s.rows.add("j", [("a:9", item(9))], cap=False)) == 1
        assert (await s.progress.stats("j"))["general"].accepted == 4
        pages = await collect(s.rows.iterate("j", page_size=2))
        assert [x.item.instruction for x in pages] == [
            "question 0",
            "question 1",
            "question 2",
            "question 9",
        ]
    finally:
        await s.close()


@pytest.mark.postgres
async def test_postgres_concurrent_writers_never_overshoot(pg_url: str) -> None:
    s = SqlStore(pg_url)
    await s.connect()
    try:
        await s.jobs.ensure("j", config={}, targets={"general": 5})
        batches = [[(f"w{w}:{i}", item(w * 10 + i)) for i in range(3)] for w in range(4)]
        results = await asyncio.gather(*(s.rows.add("j", b) for b in batches))
        assert sum(len(r) for r in results) == 5
        assert await s.rows.count("j") == 5
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


def card(name: str):  # type: ignore[no-untyped-def]
    from airoboros.contracts import Artifact

    return Artifact(kind="character", name=name, data={"description": f"NAME: {name}"})


async def apply_cards(s: SqlStore, names: list[str]) -> None:
    from airoboros.contracts import BatchStats

    await s.rows.apply_batch(
        "j",
        message_id=uuid.uuid4().hex,
        task_id=uuid.uuid4().hex,
        instructor="character",
        items=[],
        stats=BatchStats(),
        artifacts=[card(n) for n in names],
    )


async def test_cards_are_unique_by_name_and_capped(store: SqlStore) -> None:
    await store.jobs.ensure("j", config={}, targets={"character": 3})
    await apply_cards(store, ["Ada Quill", "Bram"])
    await apply_cards(store, ["ada  quill", "Cora", "Dev"])  # same name, other case/spacing
    names = [c.name for c in await store.artifacts.of_kind("j", "character")]
    assert names == ["Ada Quill", "Bram", "Cora"]
    st = (await store.progress.stats("j"))["character"]
    assert st.accepted == 3 and st.duplicates == 2  # the repeated name and the one past the cap
    assert await store.rows.count("j") == 0  # cards are not rows


async def test_uncounted_rows_follow_their_counted_row(store: SqlStore) -> None:
    from airoboros.contracts import BatchStats

    await store.jobs.ensure("j", config={}, targets={"rp": 1})

    def chat(tag: str) -> list[Item]:
        return [
            Item(instruction=f"{tag} {i}", response="r", category="rp", counted=i == 0)
            for i in range(3)
        ]

    stored = await store.rows.apply_batch(
        "j",
        message_id="m1",
        task_id="t1",
        instructor="rp",
        items=chat("first") + chat("second"),
        stats=BatchStats(),
    )
    assert stored is not None
    assert [s.item.instruction for s in stored] == ["first 0", "first 1", "first 2"]
    assert (await store.progress.stats("j"))["rp"].accepted == 1


@pytest.mark.postgres
async def test_postgres_concurrent_card_batches_make_each_name_once(pg_url: str) -> None:
    s = SqlStore(pg_url)
    await s.connect()
    try:
        await s.jobs.ensure("j", config={}, targets={"character": 10})
        await asyncio.gather(*(apply_cards(s, ["Ada", "Bram", f"Solo {i}"]) for i in range(4)))
        names = sorted(c.name for c in await s.artifacts.of_kind("j", "character"))
        assert names == ["Ada", "Bram", "Solo 0", "Solo 1", "Solo 2", "Solo 3"]
        assert (await s.progress.stats("j"))["character"].accepted == 6
    finally:
        await s.close()
