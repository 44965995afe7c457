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
from airoboros.counting import BatchOutcome, CategoryCounts
from airoboros.errors import NotFoundError, StoreError
from airoboros.store.models import (
    AdapterRecord,
    ArtifactRow,
    DeadLetterRow,
    DedupeVector,
    InstructorProgress,
    Job,
    ProcessedMessage,
    Row,
    Task,
    Upload,
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
    #: a digest of the API key that created it (None: only admin keys see it)
    owner: str | None = None
    #: its export is still to be written (the object store was unavailable)
    export_pending: bool = False
    export_error: str | None = None
    #: why the budget stopped a batch of the job (until it is resumed)
    budget_note: str | None = None


#: The counters of one instructor of a job (the name the store's callers know them by).
InstructorStats = CategoryCounts


@dataclass
class Flight:
    """An instructor's batches in flight."""

    #: batches in flight
    batches: int = 0
    #: of which not screened yet, and the items those ask for
    unscreened: int = 0
    pending_items: int = 0
    #: room in the count held by the screened ones
    reserved: int = 0


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

    async def ping(self) -> bool:
        """Whether the database answers a trivial query within two seconds."""
        from sqlalchemy import text

        try:
            async with asyncio.timeout(2.0), self._s() as s:
                await s.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

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
        owner: str | None = None,
        llm_api_key: str | None = None,
    ) -> JobRecord:
        """Create the job if new; (re)set each instructor's target. Returns the job.
        ``llm_api_key`` is the job's own key for its endpoint: kept apart from the
        config, read only by ``llm_api_key()``."""
        async with self._s() as s, s.begin():
            job = await s.get(Job, job_id)
            if job is None:
                job = Job(
                    id=job_id,
                    status="running",
                    config=json.dumps(config),
                    trace_context=json.dumps(trace_context) if trace_context else None,
                    owner=owner,
                    llm_api_key=llm_api_key,
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

    async def llm_api_key(self, job_id: str) -> str | None:
        """The job's own key for its LLM endpoint, if it gave one."""
        async with self._s() as s:
            job = await s.get(Job, job_id)
            if job is None:
                raise NotFoundError(f"no job {job_id!r}")
            return job.llm_api_key

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
            for table in (Row, Task, ProcessedMessage, DedupeVector, DeadLetterRow, ArtifactRow):
                await s.execute(delete(table).where(table.job_id == job_id))
            # Instructors' own dedupe indexes are namespaced "<job_id>:<instructor>".
            await s.execute(
                delete(DedupeVector).where(DedupeVector.job_id.startswith(job_id + ":"))
            )
            await s.execute(delete(InstructorProgress).where(InstructorProgress.job_id == job_id))
            await s.execute(delete(Job).where(Job.id == job_id))

    # --- progress -----------------------------------------------------------------------
    async def stats(self, job_id: str) -> dict[str, CategoryCounts]:
        """Each instructor's counters, with the room its batches in flight reserve."""
        async with self._s() as s:
            rows = (
                await s.execute(
                    select(InstructorProgress).where(InstructorProgress.job_id == job_id)
                )
            ).scalars()
            out = {r.instructor: _counts(r) for r in rows}
            for name, held in (await self._reserved(s, job_id)).items():
                if name in out:
                    out[name].reserved = held
            return out

    async def _reserved(
        self, s: AsyncSession, job_id: str, *, instructor: str | None = None
    ) -> dict[str, int]:
        q = (
            select(Task.instructor, func.coalesce(func.sum(Task.reserved), 0))
            .where(Task.job_id == job_id, Task.status == "in_flight")
            .group_by(Task.instructor)
        )
        if instructor is not None:
            q = q.where(Task.instructor == instructor)
        return {name: int(n or 0) for name, n in (await s.execute(q)).all()}

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
        progs: dict[str, InstructorProgress] = {}
        counts: dict[str, CategoryCounts] = {}
        for _, it in items:
            if it.category not in progs:
                progs[it.category] = await self._progress(s, job_id, it.category)
                counts[it.category] = _counts(progs[it.category])
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
        """Commit one finished batch in one transaction: its rows (capped at the target,
        idempotent by source id), its counters, streaks and usage (airoboros.counting),
        and its task's completion, which frees the room it held in the count. Returns the
        rows inserted, or None if this message was applied before."""
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
                    counts = _counts(prog)
                    kept = sum(1 for r in rows if r.counted) + made
                    inserted = {r.source_id for r in rows}
                    dropped_tokens = sum(
                        it.cost_tokens
                        for i, it in enumerate(items)
                        if f"{task_id}:{i}" not in inserted
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
                    _write(prog, counts)
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
                async with self._s() as check:
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
            if _counts(prog).admit_artifact() and await self._insert_artifact(s, job_id, a):
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
    async def add_task(self, job_id: str, task_id: str, instructor: str, asked: int = 0) -> None:
        async with self._s() as s, s.begin():
            s.add(Task(task_id=task_id, job_id=job_id, instructor=instructor, asked=asked))

    async def in_flight(self, job_id: str) -> dict[str, int]:
        return {name: f.batches for name, f in (await self.flights(job_id)).items()}

    async def flights(self, job_id: str) -> dict[str, Flight]:
        """Per instructor, its batches in flight: how many, how many not screened yet
        (and the items they ask for), and the room the screened ones hold."""
        async with self._s() as s:
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
        """Reserve room in the instructor's count for a screened batch's candidates
        (``counts[i]`` rows each), first come while it lasts, atomically with every other
        writer of that count; the task holds the room until it completes or expires.
        A task that is no longer in flight gets none. Returns the rows granted to each
        candidate (airoboros.counting.CategoryCounts.grant)."""
        async with self._s() as s, s.begin():
            prog = await self._progress(s, job_id, instructor)  # locks the count
            task = await s.get(Task, task_id)
            if task is None or task.status != "in_flight":
                return [0] * len(counts)
            held = (await self._reserved(s, job_id, instructor=instructor)).get(instructor, 0)
            c = _counts(prog)
            # A redelivery recomputes its own grant: its earlier reservation is not "held".
            c.reserved = held - (task.reserved or 0)
            granted = c.grant(counts)
            task.reserved = sum(granted)
            return granted

    async def set_skipped(self, job_id: str, instructor: str, reason: str) -> None:
        """Mark an instructor as having nothing to do in this run (not a failure)."""
        async with self._s() as s, s.begin():
            prog = await self._progress(s, job_id, instructor)
            prog.skipped = reason

    async def advance_cursor(self, job_id: str, instructor: str, n: int) -> int:
        """Move the instructor's cursor ``n`` places on; returns where it was (the places
        ``start .. start + n - 1`` are the caller's, whatever other writers do)."""
        async with self._s() as s, s.begin():
            prog = await self._progress(s, job_id, instructor)
            start = prog.cursor or 0
            prog.cursor = start + n
            return start

    async def resume_job(self, job_id: str) -> JobRecord:
        """Start a stopped (or rerun) job again from its stored counts: running, no
        cancel, and no verdict of an earlier run kept (streaks and skips reset)."""
        async with self._s() as s, s.begin():
            job = await s.get(Job, job_id)
            if job is None:
                raise NotFoundError(f"no job {job_id!r}")
            job.status, job.detail, job.finished_at = "running", None, None
            job.cancel_requested = False
            job.budget_note = None
            job.updated_at = datetime.now(UTC)
            progs = (
                await s.execute(
                    select(InstructorProgress).where(InstructorProgress.job_id == job_id)
                )
            ).scalars()
            for prog in progs:
                c = _counts(prog)
                c.resume()
                _write(prog, c)
        return await self.get_job(job_id)

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
    async def list_jobs(self, *, limit: int = 100, owner: str | None = None) -> list[JobRecord]:
        """The newest jobs; with ``owner``, only that owner's."""
        q = select(Job).order_by(Job.created_at.desc()).limit(limit)
        if owner is not None:
            q = q.where(Job.owner == owner)
        async with self._s() as s:
            return [_job_record(j) for j in (await s.execute(q)).scalars()]

    async def set_export_pending(self, job_id: str, pending: bool, error: str | None) -> None:
        async with self._s() as s, s.begin():
            await s.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(export_pending=pending, export_error=error)
            )

    async def pending_exports(self) -> list[str]:
        """Jobs that ended and still wait for their export."""
        async with self._s() as s:
            q = select(Job.id).where(Job.export_pending.is_(True))
            return list((await s.execute(q)).scalars())

    # --- uploads ----------------------------------------------------------------------
    async def add_upload(
        self, upload_id: str, *, owner: str | None, files: list[dict[str, Any]]
    ) -> None:
        async with self._s() as s, s.begin():
            s.add(
                Upload(
                    id=upload_id,
                    owner=owner,
                    files=json.dumps(files),
                    bytes=sum(int(f["bytes"]) for f in files),
                )
            )

    async def get_upload(self, upload_id: str) -> tuple[str | None, list[dict[str, Any]]]:
        """(owner, files) of an upload."""
        async with self._s() as s:
            up = await s.get(Upload, upload_id)
            if up is None:
                raise NotFoundError(f"no upload {upload_id!r}")
            return up.owner, json.loads(up.files)

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
                DeadLetterRow(
                    queue=queue, body=body, job_id=job_id, message_id=message_id, kind=kind
                )
            )

    async def dead_letters(self, job_id: str) -> list[dict[str, Any]]:
        async with self._s() as s:
            rows = (
                await s.execute(
                    select(DeadLetterRow)
                    .where(DeadLetterRow.job_id == job_id)
                    .order_by(DeadLetterRow.id)
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
    "refused",
    "unparseable",
    "truncated",
    "withheld",
    "retries",
    "asked",
    "fail_streak",
    "dup_streak",
    "wasted_tokens",
)
#: CategoryCounts fields stored as columns of instructor_stats (``reserved`` is derived)
_STORED = (*_COUNTERS, "last_failure", "skipped")


def _counts(prog: InstructorProgress) -> CategoryCounts:
    return CategoryCounts(prog.instructor, **{f: getattr(prog, f) for f in _STORED})


def _write(prog: InstructorProgress, c: CategoryCounts) -> None:
    for f in _STORED:
        setattr(prog, f, getattr(c, f))


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
        job.owner,
        bool(job.export_pending),
        job.export_error,
        job.budget_note,
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
