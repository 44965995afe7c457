"""The batch lane's repository (``BatchRepository``) held against the SQL adapter on
SQLite and PostgreSQL, with the fixtures of test_store_contract: deferred commands and
their calls, submissions recorded before their batch jobs exist, results applied once,
retries bounded in attempts, and what a restart finds."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from airoboros.contracts import BatchAnswer, BatchStats
from airoboros.store import Store
from tests.contract.test_store_contract import other, pg_database, store, url

__all__ = ["other", "pg_database", "store", "url"]  # fixtures


async def defer(store: Store, command_id: str, task_id: str, keys: list[str]) -> bool:
    return await store.batches.defer(
        "j",
        command_id=command_id,
        task_id=task_id,
        instructor="general",
        command={"kind": "generate_batch", "message_id": command_id, "task_id": task_id},
        calls=[(k, {"model": "gpt-4", "messages": [{"role": "user", "content": k}]}) for k in keys],
    )


@pytest.fixture
async def job(store: Store) -> Store:
    await store.jobs.ensure("j", config={}, targets={"general": 10})
    return store


async def test_defer_is_idempotent_and_calls_are_shared(job: Store):
    assert await defer(job, "c1", "t1", ["a", "b"])
    assert not await defer(job, "c1", "t1", ["a", "b"])  # a redelivery
    assert await defer(job, "c2", "t2", ["b", "c"])  # "b" is known: one call
    pending = await job.batches.pending("j", "general", 10)
    assert sorted(p.key for p in pending) == ["a", "b", "c"]
    assert await job.batches.pending_instructors("j") == ["general"]
    assert await job.batches.ready("j") == []


async def test_a_submission_is_recorded_before_its_batch_exists(job: Store, other: Store):
    await defer(job, "c1", "t1", ["a", "b", "c"])
    sub = await job.batches.submit("j", "general", ["a", "b"], 0.25)
    assert sub.state == "submitting" and sub.batch_id is None
    # Another replica (or a restart) sees it and its calls.
    found = await other.batches.submissions("j", unfinished=True)
    assert [(s.id, s.state, s.reserved_cost) for s in found] == [(sub.id, "submitting", 0.25)]
    assert sorted(c.key for c in await other.batches.calls_of(sub.id)) == ["a", "b"]
    assert [c.attempts for c in await other.batches.calls_of(sub.id)] == [1, 1]
    assert [p.key for p in await other.batches.pending("j", "general", 10)] == ["c"]
    await job.batches.update_submission(sub.id, input_file_id="file-1")
    await job.batches.update_submission(sub.id, batch_id="batch-1", state="open")
    (s,) = await other.batches.submissions("j")
    assert (s.input_file_id, s.batch_id, s.state) == ("file-1", "batch-1", "open")
    with pytest.raises(ValueError):
        await job.batches.update_submission(sub.id, job_id="x")


async def test_results_are_applied_once_and_failures_retried_within_attempts(job: Store):
    await defer(job, "c1", "t1", ["a", "b", "c"])
    sub = await job.batches.submit("j", "general", ["a", "b", "c"], 0.0)
    answers = {"a": BatchAnswer(text="A", prompt_tokens=1, completion_tokens=2, cost=0.1)}
    got = await job.batches.apply(
        sub.id, "completed", answers, max_attempts=2, errors={"b": "500: boom"}
    )
    assert got == (1, 2)  # a answered; b (a failed line) and c (no line) pending again
    assert await job.batches.apply(sub.id, "completed", answers, max_attempts=2) == (0, 0)
    assert sorted(p.key for p in await job.batches.pending("j", "general", 10)) == ["b", "c"]
    assert await job.batches.ready("j") == []

    second = await job.batches.submit("j", "general", ["b", "c"], 0.0)
    assert await job.batches.apply(
        second.id, "expired", {}, max_attempts=2, errors={"b": "500: boom"}
    ) == (0, 0)
    # Attempts spent: failed for good, and the command is ready with every answer.
    (ready,) = await job.batches.ready("j")
    assert ready.command_id == "c1" and ready.task_id == "t1"
    assert ready.answers["a"].text == "A"
    assert "boom" in (ready.answers["b"].error or "")
    assert "expired" in (ready.answers["c"].error or "")
    states = await job.batches.counts("j")
    assert states == {"general": {"completed": 1, "expired": 1}}
    assert await job.batches.dispatched("j", "c1")
    assert not await job.batches.dispatched("j", "c1")  # sent once only
    assert await job.batches.ready("j") == []
    assert set(await job.batches.answers("j", ["a", "b", "z"])) == {"a", "b"}


async def test_budget_failure_and_what_a_restart_finds(job: Store):
    await job.progress.add_task("j", "t1", "general", asked=3)
    await job.progress.add_task("j", "t2", "general", asked=3)
    await defer(job, "c1", "t1", ["a"])
    await defer(job, "c2", "t2", ["b"])
    assert await job.batches.fail_pending("j", "general", "budget_exhausted") == 2
    ready = await job.batches.ready("j")
    assert [r.command_id for r in ready] == ["c1", "c2"]
    assert await job.batches.dispatched("j", "c1")
    # t1's command was sent and died with its process; t2's still waits.
    assert await job.batches.waiting_tasks("j") == ["t2"]
    await job.progress.expire_tasks("j", datetime.now(UTC))
    assert await job.progress.in_flight("j") == {}
    assert await job.batches.revive("j") == 1
    assert sorted(await job.batches.waiting_tasks("j")) == ["t1", "t2"]
    assert await job.batches.keep_alive("j", ["t1", "t2"]) == 2
    assert await job.progress.in_flight("j") == {"general": 2}


async def test_answers_are_spent_until_their_task_completes(job: Store):
    await job.progress.add_task("j", "t1", "general", asked=1)
    await defer(job, "c1", "t1", ["a", "b"])
    sub = await job.batches.submit("j", "general", ["a", "b"], 0.0)
    answers = {
        "a": BatchAnswer(text="A", prompt_tokens=10, completion_tokens=5, cost=0.25),
        "b": BatchAnswer(text="B", prompt_tokens=20, completion_tokens=7, cost=0.5),
    }
    await job.batches.apply(sub.id, "completed", answers, max_attempts=1)
    assert await job.batches.unapplied_usage("j") == (42, pytest.approx(0.75))
    await job.rows.apply_batch(
        "j", message_id="m1", task_id="t1", instructor="general", items=[], stats=BatchStats()
    )
    assert await job.batches.unapplied_usage("j") == (0, 0.0)
