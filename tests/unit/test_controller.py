"""The job controller on its own: what it dispatches, what a finished batch does, how a job
ends, and that a restarted controller (or another replica) carries on from the store alone.

The store is the embedded SQLite adapter (a supported backend, not a stand-in); messages
the controller publishes are collected as a bus would deliver them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from airoboros.config import Config, parse_config
from airoboros.contracts import BatchCompleted, BatchStats, GenerateBatch, Item, Message
from airoboros.store import SqlStore
from airoboros.topics.controller import JobController, JobOutcome


class Published:
    """What the controller publishes, in order."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def __call__(self, message: Message) -> None:
        self.messages.append(message)

    def batches(self, instructor: str | None = None) -> list[GenerateBatch]:
        return [
            m
            for m in self.messages
            if isinstance(m, GenerateBatch) and instructor in (None, m.instructor)
        ]


@pytest.fixture
async def store(tmp_path: Path) -> Any:
    s = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 'jobs.sqlite'}")
    await s.connect()
    yield s
    await s.close()


def config(**top: Any) -> Config:
    instructors = top.pop("instructors", {"joke": {"count": 10, "batch_size": 5}})
    return parse_config(
        {"openai_api_key": "sk-secret", "max_concurrency": 10, **top, "instructors": instructors}
    )


async def controller(
    store: SqlStore, cfg: Config, publish: Published, job_id: str = "job", **kw: Any
) -> JobController:
    if not await store.jobs.exists(job_id):
        targets = {n: cfg.count_for(n) for n in cfg.instructors}
        await store.jobs.ensure(job_id, config=cfg.model_dump(mode="json"), targets=targets)
    return JobController(
        job_id,
        cfg,
        publish,
        jobs=store.jobs,
        progress=store.progress,
        rows=store.rows,
        artifacts=store.artifacts,
        active=list(cfg.instructors),
        pickers={},
        task_timeout=math.inf,
        seed=1,
        **kw,
    )


def rows(n: int, prefix: str = "q") -> list[Item]:
    return [Item(instruction=f"{prefix}{i}", response=f"a{i}", category="joke") for i in range(n)]


def done(task: GenerateBatch, items: list[Item], **stats: Any) -> BatchCompleted:
    return BatchCompleted(
        job_id=task.job_id,
        task_id=task.task_id,
        instructor=task.instructor,
        items=items,
        stats=BatchStats(asked=task.batch_size, proposed=len(items), **stats),
    )


async def test_it_fills_the_room_and_each_task_carries_its_settings_without_a_key(
    store: SqlStore,
) -> None:
    cfg = config(instructors={"joke": {"count": 10, "batch_size": 5}, "riddle": {"count": 3}})
    out = Published()
    ctl = await controller(store, cfg, out)
    await ctl.start()
    jokes = out.batches("joke")
    assert [t.batch_size for t in jokes] == [5, 5]  # the whole count, two calls at once
    assert sum(t.batch_size for t in out.batches("riddle")) >= 3
    for task in out.batches():
        assert task.settings is not None
        assert list(task.settings.config["instructors"]) == [task.instructor]
        assert task.settings.config.get("openai_api_key") is None
        assert "sk-secret" not in task.model_dump_json()
    # Recorded before it was published: the store knows every task in flight.
    assert (await store.progress.in_flight("job"))["joke"] == 2


async def test_a_finished_batch_counts_and_the_job_stops_at_exactly_its_count(
    store: SqlStore,
) -> None:
    out = Published()
    finished: list[JobOutcome] = []

    async def on_finish(outcome: JobOutcome) -> None:
        # Before the status is written: a job reads "done" only once this has run.
        assert (await store.jobs.get("job")).status == "running"
        finished.append(outcome)

    ctl = await controller(store, config(), out, on_finish=on_finish)
    await ctl.start()
    first, second = out.batches("joke")
    await ctl.on_completed(done(first, rows(5, "a")))
    await ctl.on_completed(done(second, rows(7, "b")))  # two more than the room left
    assert (await store.progress.stats("job"))["joke"].accepted == 10
    assert await store.rows.count("job") == 10
    assert ctl.finished and (await ctl.wait()).status == "done"
    assert [o.status for o in finished] == ["done"]
    assert (await store.jobs.get("job")).status == "done"
    # A redelivered completion changes nothing.
    await ctl.on_completed(done(first, rows(5, "a")).model_copy())
    assert await store.rows.count("job") == 10


async def test_a_budget_stop_is_kept_in_the_store_for_the_next_controller(
    store: SqlStore,
) -> None:
    out = Published()
    ctl = await controller(store, config(), out)
    await ctl.start()
    first, second = out.batches("joke")
    # The meter refused a call of the second batch: no room in the budget.
    stop = done(second, [])
    stop = stop.model_copy(
        update={"error": "budget_exhausted", "error_message": "token budget of 100 reached"}
    )
    await ctl.on_completed(stop)
    assert (await store.jobs.get("job")).budget_note == "token budget of 100 reached"
    assert not ctl.finished  # the first batch is still out
    await ctl.on_completed(done(first, rows(2)))
    assert len(out.batches()) == 2  # nothing more was sent once the budget stopped one
    assert ctl.finished and (await ctl.wait()).status == "budget_exhausted"

    # A controller that never saw that batch (a restart, another replica) ends the job
    # the same way from the store, without dispatching anything, once it is running again.
    await store.jobs.set_status("job", "running")
    again, fresh = Published(), await controller(store, config(), Published())
    fresh.publish = again
    await fresh.start()
    assert again.batches() == []
    assert (await fresh.wait()).status == "budget_exhausted"
    # A resume forgets the stop: the next run tries again.
    await store.jobs.resume("job")
    assert (await store.jobs.get("job")).budget_note is None


async def test_phases_run_in_order_and_a_restart_picks_the_right_one(store: SqlStore) -> None:
    cfg = config(instructors={"writing": {"count": 2, "batch_size": 2}, "editor": {"count": 2}})
    out = Published()
    ctl = await controller(store, cfg, out)
    await ctl.start()
    assert {t.instructor for t in out.batches()} == {"writing"}
    (task,) = out.batches("writing")
    items = [Item(instruction=f"w{i}", response=f"text {i}", category="writing") for i in range(2)]
    await ctl.on_completed(done(task, items))
    # The editor's batch carries writing rows to edit, chosen from the store.
    (edit,) = out.batches("editor")
    assert sorted(i["text"] for i in edit.inputs) == ["text 0", "text 1"]

    restarted = Published()
    ctl2 = await controller(store, cfg, restarted)
    await ctl2.start()
    assert {t.instructor for t in restarted.batches()} <= {"editor"}


async def test_a_cancel_ends_the_job_at_the_next_tick(store: SqlStore) -> None:
    out = Published()
    ctl = await controller(store, config(), out)
    await ctl.start()
    await store.jobs.request_cancel("job")
    await ctl.tick()
    assert (await ctl.wait()).status == "cancelled"
    assert (await store.jobs.get("job")).status == "cancelled"
