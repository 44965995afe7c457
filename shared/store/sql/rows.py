"""Dataset rows on ``items``: where a row is written, and never past its count."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from sqlalchemy import ColumnElement, false, func, or_, select, true, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from airoboros import metrics
from airoboros.contracts import Artifact, BatchStats, Item
from airoboros.counting import BatchOutcome, CategoryCounts
from airoboros.errors import NotFoundError, StoreError
from airoboros.store.models import (
    InstructorProgress,
    Job,
    ProcessedMessage,
    Row,
    Task,
)
from airoboros.store.ports import StoredItem
from airoboros.store.sql.artifacts import insert_artifacts
from airoboros.store.sql.engine import Database
from airoboros.store.sql.progress import counts_of, progress_row, write_counts


async def insert_items(
    s: AsyncSession,
    db: Database,
    job_id: str,
    items: Sequence[tuple[str, Item]],
    *,
    cap: bool,
) -> list[Row]:
    progs: dict[str, InstructorProgress] = {}
    counts: dict[str, CategoryCounts] = {}
    for _, it in items:
        if it.category not in progs:
            progs[it.category] = await progress_row(s, db, job_id, it.category)
            counts[it.category] = counts_of(progs[it.category])
    source_ids = [sid for sid, _ in items]
    seen = set(
        (
            await s.execute(
                select(Row.source_id).where(Row.job_id == job_id, Row.source_id.in_(source_ids))
            )
        ).scalars()
    )
    # A source id stored before, or earlier in this call, is never inserted again.
    stored: list[bool] = []
    for sid, _ in items:
        stored.append(sid in seen)
        seen.add(sid)
    # The counting rule (airoboros.counting) decides, per category, in order.
    keep: dict[int, bool] = {}
    for cat, c in counts.items():
        idx = [i for i, (_, it) in enumerate(items) if it.category == cat]
        flags = c.admit([(items[i][1].counted, stored[i]) for i in idx], cap=cap)
        keep.update(zip(idx, flags, strict=True))
        progs[cat].accepted = c.accepted
    new_rows: list[Row] = []
    for i, (sid, it) in enumerate(items):
        if not keep[i]:
            continue
        row = Row(
            job_id=job_id,
            category=it.category,
            instruction=it.instruction.strip(),
            response=it.response.strip(),
            system=it.system.strip() if it.system is not None else None,
            skip_prompt_formatting=it.skip_prompt_formatting,
            counted=it.counted,
            source_id=sid,
        )
        s.add(row)
        new_rows.append(row)
    try:
        await s.flush()
    except IntegrityError as exc:  # a concurrent writer inserted the same source_id
        raise StoreError(f"conflicting insert for job {job_id}: {exc}") from exc
    return new_rows


class SqlRows:
    """``RowRepository`` on ``items``, with the batch commit over ``items``,
    ``artifacts``, ``instructor_stats``, ``tasks``, ``jobs`` and ``processed_messages``."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def apply_batch(
        self,
        job_id: str,
        *,
        message_id: str,
        task_id: str,
        instructor: str,
        items: Sequence[Item],
        stats: BatchStats,
        artifacts: Sequence[Artifact] = (),
        error: str | None = None,
        error_message: str | None = None,
    ) -> list[StoredItem] | None:
        try:
            async with self._db.write() as s:
                if await s.get(ProcessedMessage, message_id) is not None:
                    return None
                s.add(ProcessedMessage(message_id=message_id, job_id=job_id))
                rows = await insert_items(
                    s,
                    self._db,
                    job_id,
                    [(f"{task_id}:{i}", it) for i, it in enumerate(items)],
                    cap=True,
                )
                prog = await progress_row(s, self._db, job_id, instructor)
                made = await insert_artifacts(s, job_id, prog, artifacts)
                counts = counts_of(prog)
                kept = sum(1 for r in rows if r.counted) + made
                inserted = {r.source_id for r in rows}
                dropped_tokens = sum(
                    it.cost_tokens for i, it in enumerate(items) if f"{task_id}:{i}" not in inserted
                )
                counts.apply(
                    BatchOutcome(
                        stats.model_copy(
                            update={"duplicates": stats.duplicates + len(artifacts) - made}
                        ),
                        produced=sum(1 for it in items if it.counted) + len(artifacts),
                        kept=kept,
                        error=error,
                        error_message=error_message,
                        dropped_tokens=dropped_tokens,
                    )
                )
                write_counts(prog, counts)
                if error == "budget_exhausted":
                    # A call the budget could not fit: the job ends once its batches
                    # in flight are in, whichever replica drives it.
                    await s.execute(
                        update(Job)
                        .where(Job.id == job_id)
                        .values(budget_note=error_message or "budget exhausted")
                    )
                await s.execute(
                    update(Task)
                    .where(Task.task_id == task_id, Task.status == "in_flight")
                    .values(status="done")
                )
        except (IntegrityError, StoreError):
            # A concurrent delivery of the same message won the race.
            async with self._db.session() as check:
                if await check.get(ProcessedMessage, message_id) is not None:
                    return None
            raise
        for outcome, n in (
            ("accepted", len(rows)),
            ("duplicate", stats.duplicates),
            ("filtered", stats.filtered),
            ("refused", stats.refused),
            ("unparseable", stats.unparseable),
            ("truncated", stats.truncated),
            ("withheld", stats.withheld),
            ("dropped", len(items) - len(rows)),
        ):
            if n:
                metrics.ITEMS.labels(instructor, outcome).inc(n)
        return [StoredItem(r.id, to_item(r)) for r in rows]

    async def add(
        self, job_id: str, items: Sequence[tuple[str, Item]], *, cap: bool = True
    ) -> list[StoredItem]:
        if not items:
            return []
        async with self._db.write() as s:
            rows = await insert_items(s, self._db, job_id, items, cap=cap)
        return [StoredItem(r.id, to_item(r)) for r in rows]

    async def count(self, job_id: str) -> int:
        async with self._db.session() as s:
            q = select(func.count()).where(Row.job_id == job_id, Row.bad == false())
            return int((await s.execute(q)).scalar_one())

    async def count_bad(self, job_id: str) -> int:
        async with self._db.session() as s:
            q = select(func.count()).where(Row.job_id == job_id, Row.bad == true())
            return int((await s.execute(q)).scalar_one())

    async def count_by_category(self, job_id: str) -> dict[str, int]:
        async with self._db.session() as s:
            result = await s.execute(
                select(Row.category, func.count())
                .where(Row.job_id == job_id, Row.bad == false())
                .group_by(Row.category)
            )
            return {c: int(n) for c, n in result.all()}

    async def iterate(
        self,
        job_id: str,
        *,
        after: int = 0,
        category: str | None = None,
        page_size: int = 1000,
        include_bad: bool = False,
        search: str | None = None,
    ) -> AsyncIterator[StoredItem]:
        cursor = after
        while True:
            async with self._db.session() as s:
                q = select(Row).where(Row.job_id == job_id, Row.id > cursor)
                if category is not None:
                    q = q.where(Row.category == category)
                if not include_bad:
                    q = q.where(Row.bad == false())
                if search:
                    q = q.where(matches(search))
                rows = list((await s.execute(q.order_by(Row.id).limit(page_size))).scalars())
            for r in rows:
                yield stored(r)
            if len(rows) < page_size:
                return
            cursor = rows[-1].id

    async def mark_bad(self, job_id: str, seq: int, bad: bool) -> StoredItem:
        async with self._db.write() as s:
            row = (
                await s.execute(select(Row).where(Row.job_id == job_id, Row.id == seq))
            ).scalar_one_or_none()
            if row is None:
                raise NotFoundError(f"job {job_id!r} has no row {seq}")
            row.bad = bad
            await s.flush()
            return stored(row)

    async def sample(
        self, job_id: str, categories: Sequence[str], n: int, *, unused_by: str | None = None
    ) -> list[StoredItem]:
        if n <= 0 or not categories:
            return []
        q = select(Row).where(
            Row.job_id == job_id, Row.category.in_(list(categories)), Row.bad == false()
        )
        if unused_by is not None:
            used = select(Row.response).where(Row.job_id == job_id, Row.category == unused_by)
            q = q.where(Row.response.not_in(used))
        async with self._db.session() as s:
            rows = (await s.execute(q.order_by(func.random()).limit(n))).scalars()
            return [StoredItem(r.id, to_item(r)) for r in rows]


def matches(text: str) -> ColumnElement[bool]:
    """Rows whose instruction, response or system contains ``text``, case-insensitively
    and literally: ``icontains(autoescape=True)`` escapes ``%``, ``_`` and its escape
    character ``/`` in the value (ILIKE on PostgreSQL, ``lower() LIKE lower()`` on SQLite,
    where only ASCII letters fold case)."""
    return or_(
        Row.instruction.icontains(text, autoescape=True),
        Row.response.icontains(text, autoescape=True),
        Row.system.icontains(text, autoescape=True),
    )


def stored(r: Row) -> StoredItem:
    return StoredItem(r.id, to_item(r), bool(r.bad))


# --- artifacts ----------------------------------------------------------------------------


def to_item(r: Row) -> Item:
    return Item(
        instruction=r.instruction,
        response=r.response,
        category=r.category,
        system=r.system,
        skip_prompt_formatting=r.skip_prompt_formatting,
        counted=r.counted,
    )
