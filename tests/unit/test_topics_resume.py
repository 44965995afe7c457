"""A resume racing the tick that retires the job's finished (cancelled) controller."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from airoboros.bus import InMemoryBus
from airoboros.jobboard import InMemoryJobBoard
from airoboros.objects import LocalObjectStore
from airoboros.settings import TopicsSettings
from airoboros.store import SqlStore
from airoboros.topics.service import TopicsService
from airoboros.web import Principal, key_owner

KEY = "k1"
JOB = "job-resumed"


class SlowBoard(InMemoryJobBoard):
    """Redis answering an ended status a little late (a network round trip); ``ending``
    is set when such a post has started."""

    def __init__(self) -> None:
        super().__init__()
        self.ending = asyncio.Event()

    async def post(self, job_id: str, status: str, *, api_key: str | None = None) -> None:
        if status != "running":
            self.ending.set()
            await asyncio.sleep(0.05)
        await super().post(job_id, status, api_key=api_key)


async def test_the_board_says_running_after_a_resume_that_races_the_tick(
    tmp_path: Path,
) -> None:
    """The tick retires the cancelled run (posts "cancelled"), the resume starts the new
    run (posts "running") in the middle: the board must end at "running", or the workers
    drop the resumed run's tasks and the job stalls until they time out."""
    store = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 'store.sqlite'}")
    await store.connect()
    board = SlowBoard()
    svc = TopicsService(
        TopicsSettings(api_keys=KEY),
        store,
        InMemoryBus(),
        LocalObjectStore(tmp_path / "objects"),
        board=board,
    )
    await store.jobs.ensure(JOB, config={}, targets={"joke": 2}, owner=key_owner(KEY))
    await store.jobs.set_status(JOB, "cancelled")
    old = SimpleNamespace(finished=True, outcome=SimpleNamespace(status="cancelled"), lane=None)
    svc.controllers[JOB] = old  # type: ignore[assignment]
    started: list[Any] = []

    async def take(job_id: str) -> None:  # what _take does, without a real run
        new = SimpleNamespace(finished=False, outcome=None, lane=None)
        svc.controllers[job_id] = new  # type: ignore[assignment]
        started.append(new)
        await svc.post(job_id, "running")

    svc._take = take  # type: ignore[method-assign]
    tick = asyncio.create_task(svc.tick_all())
    await asyncio.wait_for(board.ending.wait(), 10)  # the tick is posting "cancelled"
    await svc.resume(JOB, Principal(key_owner(KEY)))
    await tick
    assert await svc.board.status(JOB) == "running"
    assert len(started) == 1 and svc.controllers[JOB] is started[0]
    await store.close()
