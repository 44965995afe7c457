"""SqlStore: the SQL adapter of the store port (SQLite via aiosqlite, PostgreSQL via asyncpg).

Rows are inserted idempotently (one row per ``source_id``) and never beyond an
instructor's target: the count check and the insert share one transaction, with the
progress row locked on PostgreSQL, so concurrent writers cannot overshoot.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from airoboros.contracts import Item
from airoboros.errors import NotFoundError, StoreError
from airoboros.store.models import InstructorProgress, Job, Row
from sqlalchemy import delete, event, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

STAT_FIELDS = (
    "duplicates",
    "filtered",
    "failures",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cost",
)


@dataclass
class JobRecord:
    id: str
    status: str
    detail: str | None
    config: dict[str, Any]
    created_at: datetime
    updated_at: datetime


@dataclass
class InstructorStats:
    instructor: str
    target: int = 0
    accepted: int = 0
    duplicates: int = 0
    filtered: int = 0
    failures: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0


@dataclass
class StoredItem:
    seq: int
    item: Item


def normalize_url(url: str) -> str:
    """Accept plain sqlite:// and postgresql:// URLs and pick the async driver."""
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url[len("sqlite:///") :]
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+asyncpg://" + url.split("://", 1)[1]
    return url


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


class SqlStore:
    def __init__(self, url: str) -> None:
        self.url = normalize_url(url)
        self._engine: AsyncEngine | None = None
        self._sessions: async_sessionmaker[AsyncSession] | None = None

    @property
    def dialect(self) -> str:
        return self.url.split(":", 1)[0].split("+", 1)[0]

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
        engine = create_async_engine(self.url, pool_pre_ping=True)
        if self.dialect == "sqlite":
            sync_engine: Engine = engine.sync_engine
            event.listen(sync_engine, "connect", _sqlite_pragmas)
        self._engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)

    def _safe_url(self) -> str:
        if "@" in self.url:
            scheme, rest = self.url.split("://", 1)
            return f"{scheme}://***@{rest.split('@', 1)[1]}"
        return self.url

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    def _s(self) -> AsyncSession:
        if self._sessions is None:
            raise RuntimeError("SqlStore.connect() was not called")
        return self._sessions()

    # --- jobs ---------------------------------------------------------------------------
    async def ensure_job(
        self, job_id: str, *, config: dict[str, Any], targets: dict[str, int]
    ) -> JobRecord:
        """Create the job if new; (re)set each instructor's target. Returns the job."""
        async with self._s() as s, s.begin():
            job = await s.get(Job, job_id)
            if job is None:
                job = Job(id=job_id, status="running", config=json.dumps(config))
                s.add(job)
                await s.flush()
            else:
                job.config = json.dumps(config)
            for name, target in targets.items():
                prog = await s.get(InstructorProgress, (job_id, name))
                if prog is None:
                    s.add(InstructorProgress(job_id=job_id, instructor=name, target=target))
                else:
                    prog.target = target
        return await self.get_job(job_id)

    async def get_job(self, job_id: str) -> JobRecord:
        async with self._s() as s:
            job = await s.get(Job, job_id)
            if job is None:
                raise NotFoundError(f"no job {job_id!r}")
            return JobRecord(
                job.id,
                job.status,
                job.detail,
                json.loads(job.config),
                job.created_at,
                job.updated_at,
            )

    async def job_exists(self, job_id: str) -> bool:
        async with self._s() as s:
            return await s.get(Job, job_id) is not None

    async def set_job_status(self, job_id: str, status: str, detail: str | None = None) -> None:
        async with self._s() as s, s.begin():
            await s.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(status=status, detail=detail, updated_at=datetime.now(UTC))
            )

    async def delete_job(self, job_id: str) -> None:
        async with self._s() as s, s.begin():
            await s.execute(delete(Row).where(Row.job_id == job_id))
            await s.execute(delete(InstructorProgress).where(InstructorProgress.job_id == job_id))
            await s.execute(delete(Job).where(Job.id == job_id))

    # --- progress -----------------------------------------------------------------------
    async def stats(self, job_id: str) -> dict[str, InstructorStats]:
        async with self._s() as s:
            rows = (
                await s.execute(
                    select(InstructorProgress).where(InstructorProgress.job_id == job_id)
                )
            ).scalars()
            return {
                r.instructor: InstructorStats(
                    r.instructor,
                    r.target,
                    r.accepted,
                    r.duplicates,
                    r.filtered,
                    r.failures,
                    r.requests,
                    r.prompt_tokens,
                    r.completion_tokens,
                    r.cost,
                )
                for r in rows
            }

    async def add_stats(self, job_id: str, instructor: str, **deltas: float) -> None:
        """Add to an instructor's counters (duplicates, filtered, failures, tokens, cost)."""
        unknown = set(deltas) - set(STAT_FIELDS)
        if unknown:
            raise ValueError(f"unknown stat fields: {sorted(unknown)}")
        values = {k: getattr(InstructorProgress, k) + v for k, v in deltas.items() if v}
        if not values:
            return
        async with self._s() as s, s.begin():
            res = await s.execute(
                update(InstructorProgress)
                .where(
                    InstructorProgress.job_id == job_id,
                    InstructorProgress.instructor == instructor,
                )
                .values(**values)
            )
            if res.rowcount == 0:  # type: ignore[attr-defined]
                s.add(InstructorProgress(job_id=job_id, instructor=instructor, **deltas))

    # --- rows ---------------------------------------------------------------------------
    async def add_items(
        self, job_id: str, items: Sequence[tuple[str, Item]], *, cap: bool = True
    ) -> list[StoredItem]:
        """Insert rows keyed by source_id. A row whose source_id exists is skipped
        (redelivery); with ``cap``, rows past the instructor's target are dropped.
        Returns the rows actually inserted, in order."""
        if not items:
            return []
        async with self._s() as s, s.begin():
            by_cat: dict[str, InstructorProgress] = {}
            for _, it in items:
                if it.category in by_cat:
                    continue
                q = select(InstructorProgress).where(
                    InstructorProgress.job_id == job_id,
                    InstructorProgress.instructor == it.category,
                )
                if self.dialect == "postgresql":
                    q = q.with_for_update()
                prog = (await s.execute(q)).scalar_one_or_none()
                if prog is None:
                    prog = InstructorProgress(
                        job_id=job_id, instructor=it.category, target=0, accepted=0
                    )
                    s.add(prog)
                    await s.flush()
                by_cat[it.category] = prog
            source_ids = [sid for sid, _ in items]
            seen = set(
                (
                    await s.execute(
                        select(Row.source_id).where(
                            Row.job_id == job_id, Row.source_id.in_(source_ids)
                        )
                    )
                ).scalars()
            )
            new_rows: list[Row] = []
            for sid, it in items:
                prog = by_cat[it.category]
                if sid in seen:
                    continue
                if cap and prog.accepted >= prog.target:
                    continue
                seen.add(sid)
                prog.accepted += 1
                row = Row(
                    job_id=job_id,
                    category=it.category,
                    instruction=it.instruction.strip(),
                    response=it.response.strip(),
                    system=it.system.strip() if it.system is not None else None,
                    skip_prompt_formatting=it.skip_prompt_formatting,
                    source_id=sid,
                )
                s.add(row)
                new_rows.append(row)
            try:
                await s.flush()
            except IntegrityError as exc:  # a concurrent writer inserted the same source_id
                raise StoreError(f"conflicting insert for job {job_id}: {exc}") from exc
        return [StoredItem(r.id, _to_item(r)) for r in new_rows]

    async def count_items(self, job_id: str) -> int:
        async with self._s() as s:
            return int(
                (await s.execute(select(func.count()).where(Row.job_id == job_id))).scalar_one()
            )

    async def iter_items(
        self,
        job_id: str,
        *,
        after: int = 0,
        category: str | None = None,
        page_size: int = 1000,
    ) -> AsyncIterator[StoredItem]:
        """Rows in insertion order, paged by sequence number."""
        cursor = after
        while True:
            async with self._s() as s:
                q = select(Row).where(Row.job_id == job_id, Row.id > cursor)
                if category is not None:
                    q = q.where(Row.category == category)
                rows = list((await s.execute(q.order_by(Row.id).limit(page_size))).scalars())
            for r in rows:
                yield StoredItem(r.id, _to_item(r))
            if len(rows) < page_size:
                return
            cursor = rows[-1].id


def _to_item(r: Row) -> Item:
    return Item(
        instruction=r.instruction,
        response=r.response,
        category=r.category,
        system=r.system,
        skip_prompt_formatting=r.skip_prompt_formatting,
    )
