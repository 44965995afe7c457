"""The store's ports (airoboros.store.ports), held against the SQL adapter on SQLite (a
file per test) and on PostgreSQL (127.0.0.1:5432: one fresh database for this module,
emptied before each test and dropped at the end; skipped when none answers), so that code
written and unit-tested against the embedded database behaves the same deployed.

Each repository is tested through its port: jobs (ensure, status, cancel, resume, leases,
export flags), uploads, progress (counters, tasks in flight, grants, expiry, the cursor),
rows (the batch commit, capped and idempotent inserts, paging, sampling), artifacts, the
adapter registry, dedupe vectors and dead letters. Concurrent writers run on two stores
over one database (as two replicas would). What only one backend does (migrations, the
driver URL) lives in tests/unit/test_store.py.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from airoboros.contracts import Artifact, BatchStats, Item
from airoboros.errors import NotFoundError
from airoboros.store import SqlStore, Store, StoredItem
from airoboros.store.models import Base

# --- the backends ---------------------------------------------------------------------------


def _postgres_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


needs_postgres = pytest.mark.skipif(not _postgres_up(), reason="no PostgreSQL on 127.0.0.1:5432")


@pytest.fixture(scope="module")
def pg_database() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this module; dropped after it."""
    from airoboros.migrations import upgrade
    from tests.integration.services_harness import create_database, drop_database

    name, url = create_database()
    try:
        upgrade(url)
        yield url
    finally:
        drop_database(name)


async def _empty(url: str) -> None:
    import asyncpg

    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await conn.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=[pytest.mark.postgres, needs_postgres]),
    ]
)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'store.sqlite'}"
    pg: str = request.getfixturevalue("pg_database")
    return pg


@pytest.fixture
async def store(url: str) -> AsyncIterator[Store]:
    s: Store = SqlStore(url)
    if s.dialect == "postgresql":
        await _empty(url)  # the module's database, as new
    await s.connect(migrate=s.dialect == "sqlite")
    yield s
    await s.close()


@pytest.fixture
async def other(store: Store, url: str) -> AsyncIterator[Store]:
    """A second store over the same database: another replica."""
    s: Store = SqlStore(url)
    await s.connect(migrate=False)
    yield s
    await s.close()


# --- helpers --------------------------------------------------------------------------------


def item(n: int, category: str = "general") -> Item:
    return Item(instruction=f"  question {n}  ", response=f"answer {n}\n", category=category)


def card(name: str) -> Artifact:
    return Artifact(kind="character", name=name, data={"description": f"NAME: {name}"})


async def collect(it: AsyncIterator[StoredItem]) -> list[StoredItem]:
    return [x async for x in it]


async def apply(
    store: Store,
    instructor: str = "general",
    items: list[Item] | None = None,
    *,
    job_id: str = "j",
    message_id: str | None = None,
    task_id: str | None = None,
    stats: BatchStats | None = None,
    artifacts: list[Artifact] | None = None,
    error: str | None = None,
    error_message: str | None = None,
) -> list[StoredItem] | None:
    return await store.rows.apply_batch(
        job_id,
        message_id=message_id or uuid.uuid4().hex,
        task_id=task_id or uuid.uuid4().hex,
        instructor=instructor,
        items=items or [],
        stats=stats or BatchStats(),
        artifacts=artifacts or [],
        error=error,
        error_message=error_message,
    )


async def apply_cards(s: Store, names: list[str]) -> None:
    await apply(s, "character", artifacts=[card(n) for n in names])


# --- the store ------------------------------------------------------------------------------


async def test_the_store_refuses_use_before_connect(url: str) -> None:
    s = SqlStore(url)
    with pytest.raises(RuntimeError, match="connect"):
        await s.jobs.get("x")
    with pytest.raises(RuntimeError, match="connect"):
        await s.rows.count("x")


async def test_ping_and_dialect(store: Store, url: str) -> None:
    assert await store.ping() is True
    assert store.dialect == ("sqlite" if url.startswith("sqlite") else "postgresql")


# --- jobs -----------------------------------------------------------------------------------


async def test_ensure_get_and_set_job_status(store: Store) -> None:
    job = await store.jobs.ensure("job1", config={"model": "gpt-4"}, targets={"general": 3})
    assert job.id == "job1"
    assert job.status == "running"
    assert job.config == {"model": "gpt-4"}
    assert await store.jobs.exists("job1")
    assert not await store.jobs.exists("other")

    await store.jobs.set_status("job1", "done", "all rows written")
    got = await store.jobs.get("job1")
    assert (got.status, got.detail) == ("done", "all rows written")
    assert got.finished_at is not None

    # ensure_job again updates config and targets, keeps the job.
    again = await store.jobs.ensure("job1", config={"model": "x"}, targets={"general": 7})
    assert again.config == {"model": "x"}
    assert again.status == "done"
    assert (await store.progress.stats("job1"))["general"].target == 7

    with pytest.raises(NotFoundError):
        await store.jobs.get("missing")

    await store.jobs.set_status("job1", "running")
    assert (await store.jobs.get("job1")).finished_at is None
    await store.jobs.set_status("missing", "done")  # nothing to do, no error
    assert not await store.jobs.exists("missing")


async def test_ensure_keeps_owner_trace_and_key_apart_from_the_config(store: Store) -> None:
    await store.jobs.ensure(
        "j",
        config={"model": "m"},
        targets={"general": 1, "writing": 2},
        trace_context={"traceparent": "00-abc-def-01"},
        owner="alice",
        llm_api_key="sk-secret",
    )
    job = await store.jobs.get("j")
    assert job.owner == "alice"
    assert job.trace_context == {"traceparent": "00-abc-def-01"}
    assert "sk-secret" not in repr(job)
    assert await store.jobs.llm_api_key("j") == "sk-secret"
    stats = await store.progress.stats("j")
    assert {n: (s.target, s.accepted) for n, s in stats.items()} == {
        "general": (1, 0),
        "writing": (2, 0),
    }
    # Ensured again (a rerun): the config changes, who made it does not.
    await store.jobs.ensure("j", config={"model": "n"}, targets={}, owner="bob")
    job = await store.jobs.get("j")
    assert (job.owner, job.config) == ("alice", {"model": "n"})
    assert await store.jobs.llm_api_key("j") == "sk-secret"
    await store.jobs.ensure("nokey", config={}, targets={})
    assert await store.jobs.llm_api_key("nokey") is None
    assert (await store.jobs.get("nokey")).trace_context == {}
    with pytest.raises(NotFoundError):
        await store.jobs.llm_api_key("missing")


async def test_recent_jobs_newest_first_by_owner_and_running(store: Store) -> None:
    for i, owner in enumerate(["a", "b", "a"]):
        await store.jobs.ensure(f"j{i}", config={}, targets={}, owner=owner)
        await asyncio.sleep(0.01)  # distinct creation times
    assert [j.id for j in await store.jobs.recent()] == ["j2", "j1", "j0"]
    assert [j.id for j in await store.jobs.recent(owner="a")] == ["j2", "j0"]
    assert [j.id for j in await store.jobs.recent(limit=1)] == ["j2"]
    assert await store.jobs.recent(owner="nobody") == []
    await store.jobs.set_status("j1", "done")
    assert sorted(await store.jobs.running()) == ["j0", "j2"]


async def test_cancel_is_a_flag_and_idempotent(store: Store) -> None:
    await store.jobs.ensure("j", config={}, targets={})
    assert not (await store.jobs.get("j")).cancel_requested
    await store.jobs.request_cancel("j")
    await store.jobs.request_cancel("j")
    job = await store.jobs.get("j")
    assert job.cancel_requested and job.status == "running"
    with pytest.raises(NotFoundError):
        await store.jobs.request_cancel("missing")


async def test_resume_resets_streaks_skips_budget_note_and_cancel(store: Store) -> None:
    await store.jobs.ensure("j", config={}, targets={"general": 5, "editor": 2})
    await apply(store, items=[item(0)], stats=BatchStats(requests=1, prompt_tokens=10))
    for _ in range(2):  # two batches that gave nothing: a failure streak
        await apply(store, stats=BatchStats(requests=1, failures=1), error="server_error")
    await apply(
        store,
        stats=BatchStats(requests=1),
        error="budget_exhausted",
        error_message="token budget of 100 reached",
    )
    await store.progress.set_skipped("j", "editor", "it needs writing, and there are none")
    await store.jobs.request_cancel("j")
    await store.jobs.set_status("j", "incomplete", "general: no usable item")
    before = await store.progress.stats("j")
    assert before["general"].fail_streak == 3 and before["general"].last_failure
    assert before["editor"].skipped
    assert (await store.jobs.get("j")).budget_note == "token budget of 100 reached"

    job = await store.jobs.resume("j")
    assert (job.status, job.detail, job.finished_at) == ("running", None, None)
    assert not job.cancel_requested
    assert job.budget_note is None
    after = await store.progress.stats("j")
    assert after["general"].fail_streak == after["general"].dup_streak == 0
    assert after["general"].last_failure is None
    assert after["editor"].skipped is None
    # Counts and usage are kept: a resume carries on from them.
    assert after["general"].accepted == 1
    assert after["general"].requests == 4
    assert after["general"].prompt_tokens == 10
    assert after["general"].failures == 2
    with pytest.raises(NotFoundError):
        await store.jobs.resume("missing")


async def test_a_lease_has_one_owner_at_a_time(store: Store, other: Store) -> None:
    await store.jobs.ensure("j", config={}, targets={})
    assert await store.jobs.try_lease("j", "a", 30)
    assert await store.jobs.try_lease("j", "a", 30), "the owner renews it"
    assert not await other.jobs.try_lease("j", "b", 30)
    await other.jobs.release_lease("j", "b")  # not b's to release: nothing happens
    assert not await other.jobs.try_lease("j", "b", 30)
    await store.jobs.release_lease("j", "a")
    assert await other.jobs.try_lease("j", "b", 30)
    assert not await store.jobs.try_lease("j", "a", 30)
    assert not await store.jobs.try_lease("missing", "a", 30)


async def test_an_expired_lease_can_be_taken_over(store: Store, other: Store) -> None:
    await store.jobs.ensure("j", config={}, targets={})
    assert await store.jobs.try_lease("j", "a", 0.2)
    assert not await other.jobs.try_lease("j", "b", 30)
    await asyncio.sleep(0.4)  # a dies without releasing it
    assert await other.jobs.try_lease("j", "b", 30)
    assert not await store.jobs.try_lease("j", "a", 30)


async def test_concurrent_claims_of_a_free_lease_have_one_winner(
    store: Store, other: Store
) -> None:
    await store.jobs.ensure("j", config={}, targets={})
    claims = [(store if i % 2 else other).jobs.try_lease("j", f"replica-{i}", 30) for i in range(8)]
    assert sorted(await asyncio.gather(*claims)) == [False] * 7 + [True]


async def test_export_flags(store: Store) -> None:
    await store.jobs.ensure("a", config={}, targets={})
    await store.jobs.ensure("b", config={}, targets={})
    assert await store.jobs.pending_exports() == []
    await store.jobs.set_export_pending("a", True, None)
    await store.jobs.set_export_pending("b", True, "object store down")
    assert sorted(await store.jobs.pending_exports()) == ["a", "b"]
    job = await store.jobs.get("b")
    assert (job.export_pending, job.export_error) == (True, "object store down")
    await store.jobs.set_export("b", "s3://bucket/jobs/b/export/instructions.jsonl")
    await store.jobs.set_export_pending("b", False, None)
    assert await store.jobs.pending_exports() == ["a"]
    job = await store.jobs.get("b")
    assert job.export_uri == "s3://bucket/jobs/b/export/instructions.jsonl"
    assert (job.export_pending, job.export_error) == (False, None)


async def test_delete_job_removes_everything(store: Store) -> None:
    await store.jobs.ensure("j", config={}, targets={"general": 5, "character": 5})
    await store.jobs.ensure("keep", config={}, targets={"general": 5})
    await store.rows.add("j", [("s:0", item(0))])
    await store.rows.add("keep", [("s:0", item(0))])
    await store.progress.add_task("j", "t1", "general", asked=2)
    await apply(store, "character", artifacts=[card("Ada")], message_id="m1")
    await store.vectors.add("j", ["k"], np.ones((1, 4), dtype=np.float32))
    await store.vectors.add("j:editor", ["k"], np.ones((1, 4), dtype=np.float32))
    await store.vectors.add("keep", ["k"], np.ones((1, 4), dtype=np.float32))
    await store.dead_letters.add(queue="q", body="{}", job_id="j", message_id="m", kind="x")
    assert len(await store.artifacts.of_kind("j", "character")) == 1
    await store.jobs.delete("j")
    with pytest.raises(NotFoundError):
        await store.jobs.get("j")
    assert await store.rows.count("j") == 0
    assert await store.progress.stats("j") == {}
    assert await store.progress.flights("j") == {}
    assert await store.artifacts.of_kind("j", "character") == []
    assert await store.vectors.count("j") == 0
    assert await store.vectors.count("j:editor") == 0
    assert await store.dead_letters.for_job("j") == []
    assert await store.rows.count("keep") == 1
    assert await store.vectors.count("keep") == 1
    # Its message ids went too: the same job made again applies them afresh.
    await store.jobs.ensure("j", config={}, targets={"character": 5})
    assert await apply(store, "character", artifacts=[card("Ada")], message_id="m1") == []
    await store.jobs.delete("never-was")


# --- uploads --------------------------------------------------------------------------------


async def test_uploads_round_trip(store: Store) -> None:
    files = [{"name": "a.txt", "bytes": 3}, {"name": "b.pdf", "bytes": 10}]
    await store.uploads.add("up-1", owner="alice", files=files)
    await store.uploads.add("up-2", owner=None, files=[])
    assert await store.uploads.get("up-1") == ("alice", files)
    assert await store.uploads.get("up-2") == (None, [])
    with pytest.raises(NotFoundError):
        await store.uploads.get("up-3")


# --- progress -------------------------------------------------------------------------------


async def test_add_stats_increments(store: Store) -> None:
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
    assert (await store.progress.stats("j"))["general"].accepted == 0


async def test_set_skipped_marks_an_instructor(store: Store) -> None:
    await store.jobs.ensure("j", config={}, targets={"editor": 3})
    await store.progress.set_skipped("j", "editor", "it needs writing, and there are none")
    await store.progress.set_skipped("j", "new", "nothing to do")  # counters made for it
    stats = await store.progress.stats("j")
    assert stats["editor"].skipped == "it needs writing, and there are none"
    assert (stats["new"].skipped, stats["new"].target) == ("nothing to do", 0)


async def test_the_cursor_hands_out_disjoint_ranges(store: Store, other: Store) -> None:
    await store.jobs.ensure("j", config={}, targets={"documents": 10})
    assert await store.progress.advance_cursor("j", "documents", 3) == 0
    assert await store.progress.advance_cursor("j", "documents", 2) == 3
    starts = await asyncio.gather(
        *(
            (store if i % 2 else other).progress.advance_cursor("j", "documents", 2)
            for i in range(8)
        )
    )
    assert sorted(starts) == [5 + 2 * i for i in range(8)]
    assert await store.progress.advance_cursor("j", "documents", 1) == 21
    assert await store.progress.advance_cursor("j", "other", 1) == 0  # per instructor


async def test_tasks_in_flight_and_their_flights(store: Store) -> None:
    await store.jobs.ensure("j", config={}, targets={"general": 10, "writing": 10})
    assert await store.progress.in_flight("j") == {}
    await store.progress.add_task("j", "t1", "general", asked=4)
    await store.progress.add_task("j", "t2", "general", asked=3)
    await store.progress.add_task("j", "t3", "writing", asked=5)
    assert await store.progress.in_flight("j") == {"general": 2, "writing": 1}
    assert await store.progress.grant("j", "t1", "general", [1, 1]) == [1, 1]
    flights = await store.progress.flights("j")
    assert (
        flights["general"].batches,
        flights["general"].unscreened,
        flights["general"].pending_items,
        flights["general"].reserved,
    ) == (2, 1, 3, 2)
    assert (flights["writing"].batches, flights["writing"].pending_items) == (1, 5)
    assert (await store.progress.stats("j"))["general"].reserved == 2
    await apply(store, items=[item(0)], task_id="t1")
    assert await store.progress.in_flight("j") == {"general": 1, "writing": 1}
    assert (await store.progress.stats("j"))["general"].reserved == 0  # freed


async def test_grant_reserves_room_first_come(store: Store) -> None:
    await store.jobs.ensure("j", config={}, targets={"trivia": 10})
    await store.rows.add("j", [(f"s:{i}", item(i, "trivia")) for i in range(2)])
    for t in ("t1", "t2", "t3"):
        await store.progress.add_task("j", t, "trivia", asked=4)
    assert await store.progress.grant("j", "t1", "trivia", [2, 2, 1]) == [2, 2, 1]
    # 10 - 2 accepted - 5 held by t1: the last one that fits gets less, the rest none.
    assert await store.progress.grant("j", "t2", "trivia", [2, 2, 2]) == [2, 1, 0]
    assert (await store.progress.stats("j"))["trivia"].reserved == 8
    # A redelivered grant recomputes its own reservation, it does not add to it.
    assert await store.progress.grant("j", "t1", "trivia", [2, 2, 1]) == [2, 2, 1]
    assert (await store.progress.stats("j"))["trivia"].reserved == 8
    assert await store.progress.grant("j", "t3", "trivia", [1]) == [0]
    # Unknown or finished tasks get nothing.
    assert await store.progress.grant("j", "nope", "trivia", [1, 1]) == [0, 0]
    await apply(store, "trivia", task_id="t2", stats=BatchStats(withheld=1))
    assert await store.progress.grant("j", "t2", "trivia", [1]) == [0]
    # t2 is done: its room is free for the others again.
    assert await store.progress.grant("j", "t3", "trivia", [5]) == [3]


async def test_concurrent_grants_never_hand_out_more_than_the_room(
    store: Store, other: Store
) -> None:
    await store.jobs.ensure("j", config={}, targets={"general": 10})
    for i in range(8):
        await store.progress.add_task("j", f"t{i}", "general", asked=2)
    grants = await asyncio.gather(
        *(
            (store if i % 2 else other).progress.grant("j", f"t{i}", "general", [2, 1])
            for i in range(8)
        )
    )
    assert sum(sum(g) for g in grants) == 10
    assert (await store.progress.stats("j"))["general"].reserved == 10


async def test_expired_tasks_free_their_room_and_late_completions_still_count(
    store: Store,
) -> None:
    await store.jobs.ensure("j", config={}, targets={"general": 4})
    await store.progress.add_task("j", "old", "general", asked=2)
    assert await store.progress.grant("j", "old", "general", [1, 1, 1]) == [1, 1, 1]
    cut = datetime.now(UTC) + timedelta(seconds=0.3)
    await asyncio.sleep(0.5)
    await store.progress.add_task("j", "new", "general", asked=2)
    assert await store.progress.expire_tasks("j", datetime.now(UTC) - timedelta(hours=1)) == 0
    assert await store.progress.expire_tasks("j", cut) == 1
    assert await store.progress.expire_tasks("j", cut) == 0  # once
    assert await store.progress.in_flight("j") == {"general": 1}
    assert (await store.progress.stats("j"))["general"].reserved == 0
    assert await store.progress.grant("j", "old", "general", [1]) == [0]
    assert await store.progress.grant("j", "new", "general", [3, 3]) == [3, 1]
    # The lost message turns up after all: its rows are applied, within the count.
    stored = await apply(store, items=[item(i) for i in range(3)], task_id="old")
    assert stored is not None and len(stored) == 3
    assert await store.progress.in_flight("j") == {"general": 1}
    assert (await store.progress.stats("j"))["general"].accepted == 3


# --- rows: the batch commit -----------------------------------------------------------------


async def test_apply_batch_is_idempotent_by_message_id(store: Store, other: Store) -> None:
    await store.jobs.ensure("j", config={}, targets={"general": 10})
    await store.progress.add_task("j", "t1", "general", asked=3)
    stats = BatchStats(asked=3, proposed=3, duplicates=1, requests=2, prompt_tokens=50, cost=0.1)
    first = await apply(store, items=[item(0), item(1)], message_id="m1", task_id="t1", stats=stats)
    assert first is not None and [s.item.instruction for s in first] == [
        "question 0",
        "question 1",
    ]
    before = (await store.progress.stats("j"))["general"]
    assert (before.accepted, before.duplicates, before.requests, before.batches) == (2, 1, 2, 1)
    assert before.cost == pytest.approx(0.1)
    # Redelivered (here, or to another replica): nothing is written twice.
    for s in (store, other):
        again = await apply(s, items=[item(0), item(1)], message_id="m1", task_id="t1", stats=stats)
        assert again is None
    assert (await store.progress.stats("j"))["general"] == before
    assert await store.rows.count("j") == 2
    # Delivered twice at once: one of them applies it.
    results = await asyncio.gather(
        *(
            apply(s, items=[item(5)], message_id="m2", task_id="t2", stats=stats)
            for s in (store, other, store, other)
        )
    )
    assert sorted(r is None for r in results) == [False, True, True, True]
    assert await store.rows.count("j") == 3
    assert (await store.progress.stats("j"))["general"].batches == 2


async def test_apply_batch_caps_at_the_count_under_concurrent_writers(
    store: Store, other: Store
) -> None:
    await store.jobs.ensure("j", config={}, targets={"general": 5})
    results = await asyncio.gather(
        *(
            apply(
                store if w % 2 else other,
                items=[item(w * 10 + i) for i in range(3)],
                stats=BatchStats(asked=3, proposed=3),
            )
            for w in range(6)
        )
    )
    assert sum(len(r or []) for r in results) == 5
    assert await store.rows.count("j") == 5
    st = (await store.progress.stats("j"))["general"]
    assert (st.accepted, st.batches, st.dropped) == (5, 6, 13)


async def test_concurrent_writers_never_overshoot(store: Store, other: Store) -> None:
    await store.jobs.ensure("j", config={}, targets={"general": 5})
    batches = [[(f"w{w}:{i}", item(w * 10 + i)) for i in range(3)] for w in range(4)]
    results = await asyncio.gather(
        *((store if w % 2 else other).rows.add("j", b) for w, b in enumerate(batches))
    )
    assert sum(len(r) for r in results) == 5
    assert await store.rows.count("j") == 5
    assert (await store.progress.stats("j"))["general"].accepted == 5


async def test_apply_batch_records_usage_failures_and_the_budget_note(store: Store) -> None:
    await store.jobs.ensure("j", config={}, targets={"general": 3})
    await apply(
        store,
        stats=BatchStats(asked=2, requests=1, failures=1, excerpt="I cannot"),
        error="server_error",
        error_message="HTTP 500",
    )
    st = (await store.progress.stats("j"))["general"]
    assert (st.fail_streak, st.failures, st.requests, st.batches) == (1, 1, 1, 1)
    assert st.last_failure and "HTTP 500" in st.last_failure
    assert (await store.jobs.get("j")).budget_note is None
    await apply(store, items=[item(0)], stats=BatchStats(asked=1, proposed=1))
    assert (await store.progress.stats("j"))["general"].fail_streak == 0  # a kept row
    await apply(store, error="budget_exhausted", error_message="cost budget of $1.00 reached")
    assert (await store.jobs.get("j")).budget_note == "cost budget of $1.00 reached"
    await apply(store, error="budget_exhausted")
    assert (await store.jobs.get("j")).budget_note == "budget exhausted"


async def test_uncounted_rows_follow_their_counted_row(store: Store) -> None:
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


async def test_cards_are_unique_by_name_and_capped(store: Store) -> None:
    await store.jobs.ensure("j", config={}, targets={"character": 3})
    await apply_cards(store, ["Ada Quill", "Bram"])
    await apply_cards(store, ["ada  quill", "Cora", "Dev"])  # same name, other case/spacing
    names = [c.name for c in await store.artifacts.of_kind("j", "character")]
    assert names == ["Ada Quill", "Bram", "Cora"]
    st = (await store.progress.stats("j"))["character"]
    assert st.accepted == 3 and st.duplicates == 2  # the repeated name and the one past the cap
    assert await store.rows.count("j") == 0  # cards are not rows


async def test_concurrent_card_batches_make_each_name_once(store: Store, other: Store) -> None:
    await store.jobs.ensure("j", config={}, targets={"character": 10})
    await asyncio.gather(
        *(apply_cards(store if i % 2 else other, ["Ada", "Bram", f"Solo {i}"]) for i in range(4))
    )
    names = sorted(c.name for c in await store.artifacts.of_kind("j", "character"))
    assert names == ["Ada", "Bram", "Solo 0", "Solo 1", "Solo 2", "Solo 3"]
    assert (await store.progress.stats("j"))["character"].accepted == 6


# --- rows: inserts, paging, sampling --------------------------------------------------------


async def test_add_items_is_idempotent_by_source_id(store: Store) -> None:
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
    assert await store.rows.add("j", []) == []


async def test_add_items_caps_at_the_instructor_target(store: Store) -> None:
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


async def test_add_items_without_cap_ignores_the_target(store: Store) -> None:
    await store.jobs.ensure("j", config={}, targets={"general": 1})
    got = await store.rows.add("j", [(f"a:{i}", item(i)) for i in range(4)], cap=False)
    assert len(got) == 4
    assert await store.rows.count("j") == 4
    # Still idempotent without the cap.
    assert await store.rows.add("j", [("a:0", item(0))], cap=False) == []


async def test_add_items_past_the_cap_then_without_it(store: Store) -> None:
    await store.jobs.ensure("j", config={"k": 1}, targets={"general": 3})
    got = await store.rows.add("j", [(f"a:{i}", item(i)) for i in range(5)])
    assert [x.item.instruction for x in got] == ["question 0", "question 1", "question 2"]
    assert await store.rows.add("j", [("a:0", item(0))], cap=False) == []
    assert len(await store.rows.add("j", [("a:9", item(9))], cap=False)) == 1
    assert (await store.progress.stats("j"))["general"].accepted == 4
    pages = await collect(store.rows.iterate("j", page_size=2))
    assert [x.item.instruction for x in pages] == [
        "question 0",
        "question 1",
        "question 2",
        "question 9",
    ]


async def test_add_items_for_unknown_instructor_with_cap_drops(store: Store) -> None:
    await store.jobs.ensure("j", config={}, targets={"general": 5})
    assert await store.rows.add("j", [("x:0", item(0, "trivia"))]) == []
    assert len(await store.rows.add("j", [("x:0", item(0, "trivia"))], cap=False)) == 1


async def test_iter_items_order_category_and_paging(store: Store) -> None:
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
    assert await store.rows.count_by_category("j") == {"general": 5, "writing": 2}


async def test_iter_items_is_per_job(store: Store) -> None:
    await store.jobs.ensure("a", config={}, targets={"general": 5})
    await store.jobs.ensure("b", config={}, targets={"general": 5})
    await store.rows.add("a", [("s:0", item(0))])
    # The same source_id in another job is a different row.
    await store.rows.add("b", [("s:0", item(1)), ("s:1", item(2))])
    assert [s.item.instruction for s in await collect(store.rows.iterate("a"))] == ["question 0"]
    assert await store.rows.count("b") == 2
    assert await store.rows.count("nobody") == 0
    assert await collect(store.rows.iterate("nobody")) == []


async def test_item_optional_fields_round_trip(store: Store) -> None:
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


async def test_sample_rows_of_categories_and_unused_ones(store: Store) -> None:
    await store.jobs.ensure("j", config={}, targets={})
    writing = [
        Item(instruction=f"w{i}", response=f"text {i}", category="writing") for i in range(4)
    ]
    await store.rows.add("j", [(f"w:{i}", it) for i, it in enumerate(writing)], cap=False)
    await store.rows.add("j", [("g:0", item(0))], cap=False)
    got = await store.rows.sample("j", ["writing"], 10)
    assert sorted(s.item.instruction for s in got) == ["w0", "w1", "w2", "w3"]
    assert len(await store.rows.sample("j", ["writing", "general"], 3)) == 3
    assert await store.rows.sample("j", ["writing"], 0) == []
    assert await store.rows.sample("j", [], 5) == []
    # editor used "text 1" (its row's response is that text): it is not offered again.
    edited = Item(instruction="edit w1", response="text 1", category="editor")
    await store.rows.add("j", [("e:0", edited)], cap=False)
    unused = await store.rows.sample("j", ["writing"], 10, unused_by="editor")
    assert sorted(s.item.instruction for s in unused) == ["w0", "w2", "w3"]


async def test_search_matches_instruction_response_and_system_literally(store: Store) -> None:
    await store.jobs.ensure("j", config={}, targets={})
    rows = [
        Item(instruction="What is Photosynthesis?", response="Light to sugar.", category="a"),
        Item(instruction="Name a colour.", response="CHLOROPHYLL is green.", category="a"),
        Item(instruction="Hi", response="Hello.", category="b", system="You are a BOTANIST."),
        Item(instruction="Discount?", response="50% off", category="a"),
        Item(instruction="Discount again?", response="50 percent off", category="a"),
        Item(instruction="snake_case or camel?", response="snake case", category="a"),
        Item(instruction="a/b test", response="split", category="a"),
        Item(instruction="ab test", response="split", category="a"),
    ]
    await store.rows.add("j", [(f"s:{i}", r) for i, r in enumerate(rows)], cap=False)
    await store.jobs.ensure("other", config={}, targets={})
    await store.rows.add("other", [("s:0", rows[0])], cap=False)

    async def found(text: str, **kw: object) -> list[str]:
        got = await collect(store.rows.iterate("j", search=text, **kw))  # type: ignore[arg-type]
        return [s.item.instruction for s in got]

    assert await found("photosynthesis") == ["What is Photosynthesis?"]  # instruction, any case
    assert await found("chlorophyll") == ["Name a colour."]  # response
    assert await found("botanist") == ["Hi"]  # system
    # LIKE's wildcards and the escape character are taken literally.
    assert await found("50%") == ["Discount?"]
    assert await found("%") == ["Discount?"]
    assert await found("50_") == []  # as a wildcard, "_" would match "50%" and "50 percent"
    assert await found("_") == ["snake_case or camel?"]
    assert await found("a/b") == ["a/b test"]
    assert await found("nothing like it") == []
    assert await found("test", category="b") == []
    assert await found("discount", page_size=1) == ["Discount?", "Discount again?"]


async def test_rows_marked_bad_leave_the_dataset_and_come_back(store: Store) -> None:
    await store.jobs.ensure("j", config={}, targets={"writing": 5, "general": 5})
    added = await store.rows.add(
        "j",
        [
            ("s:0", Item(instruction="w0", response="t0", category="writing")),
            ("s:1", Item(instruction="w1", response="t1", category="writing")),
            ("s:2", item(2)),
        ],
    )
    seq = added[1].seq
    marked = await store.rows.mark_bad("j", seq, True)
    assert (marked.seq, marked.item.instruction, marked.bad) == (seq, "w1", True)
    assert await store.rows.mark_bad("j", seq, True) == marked  # idempotent
    assert [s.item.instruction for s in await collect(store.rows.iterate("j"))] == [
        "w0",
        "question 2",
    ]
    listed = await collect(store.rows.iterate("j", include_bad=True))
    assert [(s.item.instruction, s.bad) for s in listed] == [
        ("w0", False),
        ("w1", True),
        ("question 2", False),
    ]
    assert await store.rows.count("j") == 2
    assert await store.rows.count_bad("j") == 1
    assert await store.rows.count_by_category("j") == {"writing": 1, "general": 1}
    for _ in range(5):
        assert [s.item.instruction for s in await store.rows.sample("j", ["writing"], 5)] == ["w0"]
    # Still counted toward the target: marking a row bad does not ask for another.
    assert (await store.progress.stats("j"))["writing"].accepted == 2

    back = await store.rows.mark_bad("j", seq, False)
    assert back.bad is False
    assert await store.rows.count("j") == 3 and await store.rows.count_bad("j") == 0
    assert len(await collect(store.rows.iterate("j"))) == 3


async def test_mark_bad_of_an_unknown_row_or_another_jobs_row(store: Store) -> None:
    await store.jobs.ensure("a", config={}, targets={"general": 5})
    await store.jobs.ensure("b", config={}, targets={"general": 5})
    [row] = await store.rows.add("a", [("s:0", item(0))])
    with pytest.raises(NotFoundError):
        await store.rows.mark_bad("b", row.seq, True)  # a row, but of another job
    with pytest.raises(NotFoundError):
        await store.rows.mark_bad("a", row.seq + 100, True)
    with pytest.raises(NotFoundError):
        await store.rows.mark_bad("nobody", row.seq, True)
    assert await store.rows.count_bad("a") == 0


# --- artifacts ------------------------------------------------------------------------------


async def test_artifacts_are_unique_by_kind_and_folded_name(store: Store) -> None:
    await store.jobs.ensure("j", config={}, targets={"character": 10})
    assert await store.artifacts.add("j", [card("Ada Quill"), card("Bram")]) == 2
    assert await store.artifacts.add("j", [card(" ADA   quill "), card("Cora")]) == 1
    assert await store.artifacts.add("j", [card("   ")]) == 0  # no name, no card
    other_kind = Artifact(kind="place", name="Ada Quill", data={})
    assert await store.artifacts.add("j", [other_kind]) == 1
    cards = await store.artifacts.of_kind("j", "character")
    assert [c.name for c in cards] == ["Ada Quill", "Bram", "Cora"]
    assert cards[0].data == {"description": "NAME: Ada Quill"}
    assert [a.name for a in await store.artifacts.of_kind("j", "place")] == ["Ada Quill"]
    # Added outside a batch, they do not count unless asked to.
    assert (await store.progress.stats("j"))["character"].accepted == 0
    assert await store.artifacts.add("j", [card("Dev"), card("bram")], count_as="character") == 1
    assert (await store.progress.stats("j"))["character"].accepted == 1
    assert await store.artifacts.of_kind("other-job", "character") == []


# --- the adapter registry -------------------------------------------------------------------


async def test_registry_versions(store: Store) -> None:
    reg = store.registry
    await reg.register("coding", "v1", base_model="tiny", job_id="j1", dataset_uri="s3://d1")
    await reg.register("writing", "v1", base_model="tiny", job_id="j1")
    await reg.register("coding", "v2", base_model="tiny", job_id="j2")
    assert [(a.expert, a.version) for a in await reg.adapters()] == [
        ("coding", "v2"),
        ("writing", "v1"),
        ("coding", "v1"),
    ]
    assert [a.version for a in await reg.adapters("coding")] == ["v2", "v1"]
    assert [a.expert for a in await reg.adapters(job_id="j1")] == ["writing", "coding"]
    assert [a.version for a in await reg.adapters("coding", job_id="j1")] == ["v1"]

    await reg.finish("coding", "v1", status="published", uri="s3://a", metrics={"loss": 1.5})
    await reg.finish("writing", "v1", status="failed", detail="no training rows")
    by = {(a.expert, a.version): a for a in await reg.adapters()}
    a = by["coding", "v1"]
    assert (a.status, a.uri, a.metrics, a.detail) == ("published", "s3://a", {"loss": 1.5}, None)
    assert (a.base_model, a.job_id, a.dataset_uri) == ("tiny", "j1", "s3://d1")
    assert a.created_at is not None
    assert (by["writing", "v1"].status, by["writing", "v1"].detail) == (
        "failed",
        "no training rows",
    )
    assert by["coding", "v2"].status == "training" and by["coding", "v2"].metrics == {}

    # A retried training starts the version's record over; it keeps its job and dataset.
    await reg.register("writing", "v1", base_model="tiny-2", job_id="other")
    again = [a for a in await reg.adapters("writing")]
    assert len(again) == 1
    assert (again[0].status, again[0].detail, again[0].base_model) == ("training", None, "tiny-2")
    assert again[0].job_id == "j1"
    with pytest.raises(NotFoundError):
        await reg.finish("nobody", "v1", status="published")


# --- dedupe vectors -------------------------------------------------------------------------


async def test_vectors_load_since_and_are_idempotent_by_key(store: Store, other: Store) -> None:
    rng = np.random.default_rng(0)
    v = rng.standard_normal((4, 8)).astype(np.float32)
    seqs, keys, vecs = await store.vectors.load("j")
    assert (seqs, keys, vecs.shape) == ([], [], (0, 0))
    await store.vectors.add("j", ["a", "b"], v[:2])
    await store.vectors.add("j", ["b", "c"], v[1:3])  # b again: kept once
    await store.vectors.add("j:editor", ["a"], v[3:])  # another namespace
    assert await store.vectors.count("j") == 3
    seqs, keys, vecs = await other.vectors.load("j")
    assert keys == ["a", "b", "c"]
    assert seqs == sorted(seqs)
    np.testing.assert_array_equal(vecs, v[:3])
    assert vecs.dtype == np.float32
    # Only what was added since the last sequence number seen.
    await other.vectors.add("j", ["d"], v[3:].astype(np.float64))  # stored as float32
    seqs2, keys2, vecs2 = await store.vectors.load("j", after=seqs[-1])
    assert keys2 == ["d"] and seqs2[0] > seqs[-1]
    np.testing.assert_array_equal(vecs2, v[3:])
    assert (await store.vectors.load("j", after=seqs2[-1]))[1] == []
    assert (await store.vectors.load("j:editor"))[1] == ["a"]
    with pytest.raises(ValueError):
        await store.vectors.add("j", ["x", "y"], v[:1])  # a key per row


async def test_vectors_exclusive_lets_one_replica_hold_a_namespace(
    store: Store, other: Store
) -> None:
    """PostgreSQL: a second holder of the namespace (another replica) waits until the first
    lets go, and sees what the first added under it; another namespace does not wait.
    SQLite (one process) excludes nothing across stores."""
    order: list[str] = []
    async with store.vectors.exclusive("j"):
        second = asyncio.create_task(_hold(other, "j", order))
        async with other.vectors.exclusive("j:editor"):  # another namespace: no wait
            order.append("other namespace")
        await asyncio.sleep(0.3)
        await store.vectors.add("j", ["a"], np.ones((1, 4), dtype=np.float32))
        order.append("first")
    await asyncio.wait_for(second, 10)
    if store.dialect == "postgresql":
        assert order == ["other namespace", "first", "second saw 1"]
    else:
        assert order.index("second saw 0") < order.index("first")
    # Released on an error too.
    with pytest.raises(RuntimeError):
        async with store.vectors.exclusive("j"):
            raise RuntimeError("boom")
    async with asyncio.timeout(5), other.vectors.exclusive("j"):
        pass


async def _hold(s: Store, namespace: str, order: list[str]) -> None:
    async with s.vectors.exclusive(namespace):
        order.append(f"second saw {await s.vectors.count(namespace)}")


# --- dead letters ---------------------------------------------------------------------------


async def test_dead_letters_by_job(store: Store) -> None:
    for n, (job, kind) in enumerate(
        [("a", "generate_batch"), ("b", "x"), ("a", "batch_completed")]
    ):
        await store.dead_letters.add(
            queue=f"q{n}.dlq",
            body="{}",
            job_id=job,
            message_id=f"m{n}",
            kind=kind,
            reason=f"reason {n}" if n != 2 else None,
        )
    await store.dead_letters.add(
        queue="q.dlq", body="not json", job_id=None, message_id=None, kind=None
    )
    got = await store.dead_letters.for_job("a")
    assert [(d["queue"], d["message_id"], d["kind"], d["reason"]) for d in got] == [
        ("q0.dlq", "m0", "generate_batch", "reason 0"),
        ("q2.dlq", "m2", "batch_completed", None),
    ]
    assert all(datetime.fromisoformat(d["created_at"]) for d in got)
    assert len(await store.dead_letters.for_job("b")) == 1
    assert await store.dead_letters.for_job("c") == []
