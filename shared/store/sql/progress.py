"""Each instructor's counters, streaks, cursor and tasks in flight, on ``instructor_stats`` and
``tasks``: the counting rules (airoboros.counting) applied in the store's transactions."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from airoboros.counting import CategoryCounts
from airoboros.store.models import (
    InstructorProgress,
    Task,
)
from airoboros.store.ports import (
    STAT_FIELDS,
    Flight,
)
from airoboros.store.sql.engine import Database


async def progress_row(
    s: AsyncSession, db: Database, job_id: str, instructor: str
) -> InstructorProgress:
    """The instructor's progress row, locked for the transaction on PostgreSQL (SQLite's
    write transactions hold the database's write lock already); created at zero if new."""
    q = select(InstructorProgress).where(
        InstructorProgress.job_id == job_id, InstructorProgress.instructor == instructor
    )
    if db.dialect == "postgresql":
        q = q.with_for_update()  # serialises writers of one instructor's count
    prog = (await s.execute(q)).scalar_one_or_none()
    if prog is None:
        prog = InstructorProgress(
            job_id=job_id, instructor=instructor, **dict.fromkeys(COUNTERS, 0)
        )
        s.add(prog)
        await s.flush()
    return prog


async def reserved_room(
    s: AsyncSession, job_id: str, *, instructor: str | None = None
) -> dict[str, int]:
    q = (
        select(Task.instructor, func.coalesce(func.sum(Task.reserved), 0))
        .where(Task.job_id == job_id, Task.status == "in_flight")
        .group_by(Task.instructor)
    )
    if instructor is not None:
        q = q.where(Task.instructor == instructor)
    return {name: int(n or 0) for name, n in (await s.execute(q)).all()}


class SqlProgress:
    """``ProgressRepository`` on ``instructor_stats`` and ``tasks``."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def stats(self, job_id: str) -> dict[str, CategoryCounts]:
        async with self._db.session() as s:
            rows = (
                await s.execute(
                    select(InstructorProgress).where(InstructorProgress.job_id == job_id)
                )
            ).scalars()
            out = {r.instructor: counts_of(r) for r in rows}
            for name, held in (await reserved_room(s, job_id)).items():
                if name in out:
                    out[name].reserved = held
            return out

    async def add_stats(self, job_id: str, instructor: str, **deltas: float) -> None:
        unknown = set(deltas) - set(STAT_FIELDS)
        if unknown:
            raise ValueError(f"unknown stat fields: {sorted(unknown)}")
        values = {k: getattr(InstructorProgress, k) + v for k, v in deltas.items() if v}
        if not values:
            return
        async with self._db.write() as s:
            res = await s.execute(
                update(InstructorProgress)
                .where(
                    InstructorProgress.job_id == job_id,
                    InstructorProgress.instructor == instructor,
                )
                .values(**values)
            )
            if res.rowcount == 0:  # type: ignore[attr-defined]
                s.add(
                    InstructorProgress(
                        job_id=job_id,
                        instructor=instructor,
                        **{**dict.fromkeys(COUNTERS, 0), **deltas},
                    )
                )

    async def set_skipped(self, job_id: str, instructor: str, reason: str) -> None:
        async with self._db.write() as s:
            prog = await progress_row(s, self._db, job_id, instructor)
            prog.skipped = reason

    async def advance_cursor(self, job_id: str, instructor: str, n: int) -> int:
        async with self._db.write() as s:
            prog = await progress_row(s, self._db, job_id, instructor)
            start = prog.cursor or 0
            prog.cursor = start + n
            return start

    async def add_task(self, job_id: str, task_id: str, instructor: str, asked: int = 0) -> None:
        async with self._db.write() as s:
            s.add(Task(task_id=task_id, job_id=job_id, instructor=instructor, asked=asked))

    async def in_flight(self, job_id: str) -> dict[str, int]:
        return {name: f.batches for name, f in (await self.flights(job_id)).items()}

    async def flights(self, job_id: str) -> dict[str, Flight]:
        async with self._db.session() as s:
            rows = await s.execute(
                select(Task.instructor, Task.asked, Task.reserved).where(
                    Task.job_id == job_id, Task.status == "in_flight"
                )
            )
            out: dict[str, Flight] = {}
            for name, asked, reserved in rows.all():
                f = out.setdefault(name, Flight())
                f.batches += 1
                if reserved is None:
                    f.unscreened += 1
                    f.pending_items += int(asked or 0)
                else:
                    f.reserved += int(reserved)
            return out

    async def grant(
        self, job_id: str, task_id: str, instructor: str, counts: Sequence[int]
    ) -> list[int]:
        async with self._db.write() as s:
            prog = await progress_row(s, self._db, job_id, instructor)  # locks the count
            task = await s.get(Task, task_id)
            if task is None or task.status != "in_flight":
                return [0] * len(counts)
            held = (await reserved_room(s, job_id, instructor=instructor)).get(instructor, 0)
            c = counts_of(prog)
            # A redelivery recomputes its own grant: its earlier reservation is not "held".
            c.reserved = held - (task.reserved or 0)
            granted = c.grant(counts)
            task.reserved = sum(granted)
            return granted

    async def expire_tasks(self, job_id: str, older_than: datetime) -> int:
        async with self._db.write() as s:
            res = await s.execute(
                update(Task)
                .where(
                    Task.job_id == job_id,
                    Task.status == "in_flight",
                    Task.created_at < older_than,
                )
                .values(status="expired")
            )
            return int(res.rowcount)  # type: ignore[attr-defined]


# --- rows ---------------------------------------------------------------------------------


COUNTERS = (
    "target",
    "accepted",
    *STAT_FIELDS,
    "batches",
    "rows_from_batches",
    "dropped",
    "refused",
    "unparseable",
    "truncated",
    "withheld",
    "retries",
    "asked",
    "fail_streak",
    "dup_streak",
    "wasted_tokens",
    "proposed",
)
#: CategoryCounts fields stored as columns of instructor_stats (``reserved`` is derived)
STORED = (*COUNTERS, "last_failure", "skipped")


def counts_of(prog: InstructorProgress) -> CategoryCounts:
    return CategoryCounts(prog.instructor, **{f: getattr(prog, f) for f in STORED})


def write_counts(prog: InstructorProgress, c: CategoryCounts) -> None:
    for f in STORED:
        setattr(prog, f, getattr(c, f))
