"""SqlStore: the SQL adapter of the store port (SQLite via aiosqlite, PostgreSQL via asyncpg).

Rows are inserted idempotently (one row per ``source_id``) and never beyond an
instructor's target: the count check and the insert share one transaction, with the
progress row locked on PostgreSQL, so concurrent writers cannot overshoot.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, event, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from airoboros import metrics
from airoboros.contracts import Artifact, BatchStats, Item
from airoboros.errors import NotFoundError, StoreError
from airoboros.store.models import (
    AdapterRecord,
    ArtifactRow,
    DeadLetter,
    DedupeVector,
    InstructorProgress,
    Job,
    ProcessedMessage,
    Row,
    Task,
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
class AdapterInfo:
    expert: str
    version: str
    base_model: str
    status: str
    job_id: str | None
    dataset_uri: str | None
    uri: str | None
    metrics: dict[str, Any]
    detail: str | None
    created_at: datetime


@dataclass
class JobRecord:
    id: str
    status: str
    detail: str | None
    config: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    cancel_requested: bool = False
    export_uri: str | None = None
    finished_at: datetime | None = None
    #: W3C trace context of the request that created the job ({} when none)
    trace_context: dict[str, str] = field(default_factory=dict)


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
    batches: int = 0
    rows_from_batches: int = 0
    dropped: int = 0
    barren: int = 0


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
        self,
        job_id: str,
        *,
        config: dict[str, Any],
        targets: dict[str, int],
        trace_context: dict[str, str] | None = None,
    ) -> JobRecord:
        """Create the job if new; (re)set each instructor's target. Returns the job."""
        async with self._s() as s, s.begin():
            job = await s.get(Job, job_id)
            if job is None:
                job = Job(
                    id=job_id,
                    status="running",
                    config=json.dumps(config),
                    trace_context=json.dumps(trace_context) if trace_context else None,
                )
                s.add(job)
                await s.flush()
            else:
                job.config = json.dumps(config)
            for name, target in targets.items():
                prog = await s.get(InstructorProgress, (job_id, name))
                if prog is None:
                    s.add(
                        InstructorProgress(
                            job_id=job_id,
                            instructor=name,
                            **{**dict.fromkeys(_COUNTERS, 0), "target": target},
                        )
                    )
                else:
                    prog.target = target
        return await self.get_job(job_id)

    async def get_job(self, job_id: str) -> JobRecord:
        async with self._s() as s:
            job = await s.get(Job, job_id)
            if job is None:
                raise NotFoundError(f"no job {job_id!r}")
            return _job_record(job)

    async def job_exists(self, job_id: str) -> bool:
        async with self._s() as s:
            return await s.get(Job, job_id) is not None

    async def set_job_status(self, job_id: str, status: str, detail: str | None = None) -> None:
        async with self._s() as s, s.begin():
            await s.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(
                    status=status,
                    detail=detail,
                    updated_at=datetime.now(UTC),
                    finished_at=None if status == "running" else datetime.now(UTC),
                )
            )

    async def delete_job(self, job_id: str) -> None:
        async with self._s() as s, s.begin():
            for table in (Row, Task, ProcessedMessage, DedupeVector, DeadLetter, ArtifactRow):
                await s.execute(delete(table).where(table.job_id == job_id))
            # Instructors' own dedupe indexes are namespaced "<job_id>:<instructor>".
            await s.execute(
                delete(DedupeVector).where(DedupeVector.job_id.startswith(job_id + ":"))
            )
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
                    r.batches,
                    r.rows_from_batches,
                    r.dropped,
                    r.barren,
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
                s.add(
                    InstructorProgress(
                        job_id=job_id,
                        instructor=instructor,
                        **{**dict.fromkeys(_COUNTERS, 0), **deltas},
                    )
                )

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
            rows = await self._insert_items(s, job_id, items, cap=cap)
        return [StoredItem(r.id, _to_item(r)) for r in rows]

    async def _progress(self, s: AsyncSession, job_id: str, instructor: str) -> InstructorProgress:
        q = select(InstructorProgress).where(
            InstructorProgress.job_id == job_id, InstructorProgress.instructor == instructor
        )
        if self.dialect == "postgresql":
            q = q.with_for_update()  # serialises writers of one instructor's count
        prog = (await s.execute(q)).scalar_one_or_none()
        if prog is None:
            prog = InstructorProgress(
                job_id=job_id, instructor=instructor, **dict.fromkeys(_COUNTERS, 0)
            )
            s.add(prog)
            await s.flush()
        return prog

    async def _insert_items(
        self, s: AsyncSession, job_id: str, items: Sequence[tuple[str, Item]], *, cap: bool
    ) -> list[Row]:
        by_cat: dict[str, InstructorProgress] = {}
        for _, it in items:
            if it.category not in by_cat:
                by_cat[it.category] = await self._progress(s, job_id, it.category)
        source_ids = [sid for sid, _ in items]
        seen = set(
            (
                await s.execute(
                    select(Row.source_id).where(Row.job_id == job_id, Row.source_id.in_(source_ids))
                )
            ).scalars()
        )
        new_rows: list[Row] = []
        # An uncounted row (the later turns of an rp chat) goes where its counted row went.
        keep_group = True
        for sid, it in items:
            prog = by_cat[it.category]
            if it.counted:
                keep_group = not (cap and prog.accepted >= prog.target)
            if sid in seen or not keep_group:
                continue
            seen.add(sid)
            if it.counted:
                prog.accepted += 1
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
    ) -> list[StoredItem] | None:
        """Commit one finished batch in one transaction: its rows (capped at the target,
        idempotent by source id), its counters and usage, and its task's completion.
        Returns the rows inserted, or None if this message was applied before."""
        async with self._s() as s:
            try:
                async with s.begin():
                    if await s.get(ProcessedMessage, message_id) is not None:
                        return None
                    s.add(ProcessedMessage(message_id=message_id, job_id=job_id))
                    rows = await self._insert_items(
                        s, job_id, [(f"{task_id}:{i}", it) for i, it in enumerate(items)], cap=True
                    )
                    prog = await self._progress(s, job_id, instructor)
                    made = await self._insert_artifacts(s, job_id, prog, artifacts)
                    prog.duplicates += stats.duplicates + len(artifacts) - made
                    prog.filtered += stats.filtered
                    prog.failures += stats.failures
                    prog.requests += stats.requests
                    prog.prompt_tokens += stats.prompt_tokens
                    prog.completion_tokens += stats.completion_tokens
                    prog.cost += stats.cost
                    prog.batches += 1
                    prog.rows_from_batches += len(items)
                    prog.dropped += len(items) - len(rows)
                    prog.barren = 0 if rows or made else prog.barren + 1
                    await s.execute(
                        update(Task)
                        .where(Task.task_id == task_id, Task.status == "in_flight")
                        .values(status="done")
                    )
            except (IntegrityError, StoreError):
                # A concurrent delivery of the same message won the race.
                async with self._s() as check:
                    if await check.get(ProcessedMessage, message_id) is not None:
                        return None
                raise
        for outcome, n in (
            ("accepted", len(rows)),
            ("duplicate", stats.duplicates),
            ("filtered", stats.filtered),
            ("dropped", len(items) - len(rows)),
        ):
            if n:
                metrics.ITEMS.labels(instructor, outcome).inc(n)
        return [StoredItem(r.id, _to_item(r)) for r in rows]

    async def _insert_artifact(self, s: AsyncSession, job_id: str, a: Artifact) -> bool:
        """Add one artifact unless one of its kind and name exists; True when added."""
        key = _name_key(a.name)
        if not key:
            return False
        exists = await s.execute(
            select(ArtifactRow.id).where(
                ArtifactRow.job_id == job_id,
                ArtifactRow.kind == a.kind,
                ArtifactRow.name_key == key,
            )
        )
        if exists.first() is not None:
            return False
        s.add(
            ArtifactRow(
                job_id=job_id,
                kind=a.kind,
                name=a.name.strip(),
                name_key=key,
                data=json.dumps(a.data, ensure_ascii=False),
            )
        )
        await s.flush()
        return True

    async def _insert_artifacts(
        self,
        s: AsyncSession,
        job_id: str,
        prog: InstructorProgress,
        artifacts: Sequence[Artifact],
    ) -> int:
        """Add artifacts that are new by (kind, name), up to the instructor's target; each
        counts toward it. Returns how many were added."""
        made = 0
        for a in artifacts:
            if prog.accepted < prog.target and await self._insert_artifact(s, job_id, a):
                prog.accepted += 1
                made += 1
        return made

    async def add_artifacts(
        self, job_id: str, artifacts: Sequence[Artifact], *, count_as: str | None = None
    ) -> int:
        """Add artifacts outside any batch (cards adopted from disk), new names only;
        with ``count_as``, each added one counts toward that instructor's target."""
        made = 0
        async with self._s() as s, s.begin():
            prog = await self._progress(s, job_id, count_as) if count_as else None
            for a in artifacts:
                if await self._insert_artifact(s, job_id, a):
                    made += 1
                    if prog is not None:
                        prog.accepted += 1
        return made

    async def artifacts(self, job_id: str, kind: str) -> list[Artifact]:
        async with self._s() as s:
            rows = (
                await s.execute(
                    select(ArtifactRow)
                    .where(ArtifactRow.job_id == job_id, ArtifactRow.kind == kind)
                    .order_by(ArtifactRow.id)
                )
            ).scalars()
            return [Artifact(kind=r.kind, name=r.name, data=json.loads(r.data)) for r in rows]

    async def sample_items(
        self, job_id: str, categories: Sequence[str], n: int, *, unused_by: str | None = None
    ) -> list[StoredItem]:
        """Up to ``n`` random rows of the given categories (source material for editor
        and stylized_response); with ``unused_by``, only rows whose response is not yet
        the response of a row of that category (a writing row editor has not used)."""
        if n <= 0 or not categories:
            return []
        q = select(Row).where(Row.job_id == job_id, Row.category.in_(list(categories)))
        if unused_by is not None:
            used = select(Row.response).where(Row.job_id == job_id, Row.category == unused_by)
            q = q.where(Row.response.not_in(used))
        async with self._s() as s:
            rows = (await s.execute(q.order_by(func.random()).limit(n))).scalars()
            return [StoredItem(r.id, _to_item(r)) for r in rows]

    async def count_by_category(self, job_id: str) -> dict[str, int]:
        async with self._s() as s:
            result = await s.execute(
                select(Row.category, func.count())
                .where(Row.job_id == job_id)
                .group_by(Row.category)
            )
            return {c: int(n) for c, n in result.all()}

    # --- the adapter registry -----------------------------------------------------------
    async def register_adapter(
        self,
        expert: str,
        version: str,
        *,
        base_model: str,
        job_id: str | None = None,
        dataset_uri: str | None = None,
    ) -> None:
        """Record that ``expert`` ``version`` is being trained (idempotent: a retried
        training of the same version starts its row over)."""
        async with self._s() as s, s.begin():
            rec = await self._adapter(s, expert, version)
            if rec is None:
                s.add(
                    AdapterRecord(
                        expert=expert,
                        version=version,
                        base_model=base_model,
                        status="training",
                        job_id=job_id,
                        dataset_uri=dataset_uri,
                    )
                )
            else:
                rec.status, rec.detail, rec.base_model = "training", None, base_model

    async def finish_adapter(
        self,
        expert: str,
        version: str,
        *,
        status: str,
        uri: str | None = None,
        metrics: dict[str, Any] | None = None,
        detail: str | None = None,
    ) -> None:
        async with self._s() as s, s.begin():
            rec = await self._adapter(s, expert, version)
            if rec is None:
                raise NotFoundError(f"adapter {expert} {version} is not registered")
            rec.status, rec.uri, rec.detail = status, uri, detail
            rec.metrics = json.dumps(metrics or {})

    async def adapters(
        self, expert: str | None = None, *, job_id: str | None = None
    ) -> list[AdapterInfo]:
        """Registered adapters, newest first."""
        q = select(AdapterRecord).order_by(AdapterRecord.id.desc())
        if expert is not None:
            q = q.where(AdapterRecord.expert == expert)
        if job_id is not None:
            q = q.where(AdapterRecord.job_id == job_id)
        async with self._s() as s:
            return [
                AdapterInfo(
                    r.expert,
                    r.version,
                    r.base_model,
                    r.status,
                    r.job_id,
                    r.dataset_uri,
                    r.uri,
                    json.loads(r.metrics or "{}"),
                    r.detail,
                    r.created_at,
                )
                for r in (await s.execute(q)).scalars()
            ]

    @staticmethod
    async def _adapter(s: AsyncSession, expert: str, version: str) -> AdapterRecord | None:
        q = select(AdapterRecord).where(
            AdapterRecord.expert == expert, AdapterRecord.version == version
        )
        return (await s.execute(q)).scalar_one_or_none()

    # --- tasks --------------------------------------------------------------------------
    async def add_task(self, job_id: str, task_id: str, instructor: str) -> None:
        async with self._s() as s, s.begin():
            s.add(Task(task_id=task_id, job_id=job_id, instructor=instructor))

    async def in_flight(self, job_id: str) -> dict[str, int]:
        async with self._s() as s:
            rows = await s.execute(
                select(Task.instructor, func.count())
                .where(Task.job_id == job_id, Task.status == "in_flight")
                .group_by(Task.instructor)
            )
            return {name: int(n) for name, n in rows.all()}

    async def expire_tasks(self, job_id: str, older_than: datetime) -> int:
        """Give up on tasks in flight since before ``older_than`` (their message was lost);
        a late completion is still applied."""
        async with self._s() as s, s.begin():
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

    # --- jobs: listing, cancel, leases ---------------------------------------------------
    async def list_jobs(self, *, limit: int = 100) -> list[JobRecord]:
        async with self._s() as s:
            jobs = (
                await s.execute(select(Job).order_by(Job.created_at.desc()).limit(limit))
            ).scalars()
            return [_job_record(j) for j in jobs]

    async def request_cancel(self, job_id: str) -> None:
        async with self._s() as s, s.begin():
            res = await s.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
            if res.rowcount == 0:  # type: ignore[attr-defined]
                raise NotFoundError(f"no job {job_id!r}")

    async def set_export(self, job_id: str, uri: str) -> None:
        async with self._s() as s, s.begin():
            await s.execute(update(Job).where(Job.id == job_id).values(export_uri=uri))

    async def try_lease(self, job_id: str, owner: str, seconds: float) -> bool:
        """Take or renew the job's lease for ``owner``; False if another owner holds it."""
        now = datetime.now(UTC)
        async with self._s() as s, s.begin():
            res = await s.execute(
                update(Job)
                .where(
                    Job.id == job_id,
                    (Job.lease_owner.is_(None))
                    | (Job.lease_owner == owner)
                    | (Job.lease_until < now),
                )
                .values(lease_owner=owner, lease_until=now + timedelta(seconds=seconds))
            )
            return bool(res.rowcount)  # type: ignore[attr-defined]

    async def release_lease(self, job_id: str, owner: str) -> None:
        async with self._s() as s, s.begin():
            await s.execute(
                update(Job)
                .where(Job.id == job_id, Job.lease_owner == owner)
                .values(lease_owner=None, lease_until=None)
            )

    async def running_jobs(self) -> list[str]:
        async with self._s() as s:
            return list((await s.execute(select(Job.id).where(Job.status == "running"))).scalars())

    # --- dedupe vectors ------------------------------------------------------------------
    async def add_vectors(self, job_id: str, keys: Sequence[str], vectors: Any) -> None:
        """Persist accepted embeddings (float32 rows) so any dedupe replica can rebuild."""
        import numpy as np

        v = np.ascontiguousarray(vectors, dtype=np.float32)
        async with self._s() as s, s.begin():
            existing = set(
                (
                    await s.execute(
                        select(DedupeVector.key).where(
                            DedupeVector.job_id == job_id, DedupeVector.key.in_(list(keys))
                        )
                    )
                ).scalars()
            )
            for key, row in zip(keys, v, strict=True):
                if key not in existing:
                    s.add(DedupeVector(job_id=job_id, key=key, vector=row.tobytes()))

    async def load_vectors(
        self, job_id: str, *, after: int = 0
    ) -> tuple[list[int], list[str], Any]:
        """Vectors persisted after sequence ``after``: (sequence ids, keys, [n, dim] array)."""
        import numpy as np

        async with self._s() as s:
            rows = (
                await s.execute(
                    select(DedupeVector.id, DedupeVector.key, DedupeVector.vector)
                    .where(DedupeVector.job_id == job_id, DedupeVector.id > after)
                    .order_by(DedupeVector.id)
                )
            ).all()
        if not rows:
            return [], [], np.zeros((0, 0), dtype=np.float32)
        vecs = np.stack([np.frombuffer(r[2], dtype=np.float32) for r in rows])
        return [r[0] for r in rows], [r[1] for r in rows], vecs

    async def count_vectors(self, job_id: str) -> int:
        async with self._s() as s:
            return int(
                (
                    await s.execute(select(func.count()).where(DedupeVector.job_id == job_id))
                ).scalar_one()
            )

    # --- dead letters --------------------------------------------------------------------
    async def add_dead_letter(
        self, *, queue: str, body: str, job_id: str | None, message_id: str | None, kind: str | None
    ) -> None:
        async with self._s() as s, s.begin():
            s.add(
                DeadLetter(queue=queue, body=body, job_id=job_id, message_id=message_id, kind=kind)
            )

    async def dead_letters(self, job_id: str) -> list[dict[str, Any]]:
        async with self._s() as s:
            rows = (
                await s.execute(
                    select(DeadLetter).where(DeadLetter.job_id == job_id).order_by(DeadLetter.id)
                )
            ).scalars()
            return [
                {
                    "queue": r.queue,
                    "message_id": r.message_id,
                    "kind": r.kind,
                    "created_at": r.created_at.isoformat(),
                }
                for r in rows
            ]

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


_COUNTERS = (
    "target",
    "accepted",
    *STAT_FIELDS,
    "batches",
    "rows_from_batches",
    "dropped",
    "barren",
)


def _job_record(job: Job) -> JobRecord:
    return JobRecord(
        job.id,
        job.status,
        job.detail,
        json.loads(job.config),
        job.created_at,
        job.updated_at,
        job.cancel_requested,
        job.export_uri,
        job.finished_at,
        json.loads(job.trace_context) if job.trace_context else {},
    )


def _name_key(name: str) -> str:
    return " ".join(name.lower().split())[:255]


def _to_item(r: Row) -> Item:
    return Item(
        instruction=r.instruction,
        response=r.response,
        category=r.category,
        system=r.system,
        skip_prompt_formatting=r.skip_prompt_formatting,
        counted=r.counted,
    )
