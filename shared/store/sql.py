"""SqlStore: the SQL adapter of the store's ports (airoboros.store.ports), SQLite via
aiosqlite and PostgreSQL via asyncpg, one engine shared by its repositories.

Each repository method is one transaction. Writers of one instructor's count are
serialised: on PostgreSQL by locking its progress row (``FOR UPDATE``), on SQLite by
taking the database's write lock when the transaction begins (``BEGIN IMMEDIATE``;
SQLite's default, deferred transactions would read a count, then wait for the lock
and write a stale one). So rows are inserted idempotently (one per ``source_id``) and
never beyond an instructor's target, even with concurrent writers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, event, func, select, text, update
from sqlalchemy.engine import Connection, Engine
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
from airoboros.store.ports import (
    STAT_FIELDS,
    AdapterInfo,
    AdapterRegistry,
    ArtifactRepository,
    DeadLetterRepository,
    Flight,
    JobRecord,
    JobRepository,
    ProgressRepository,
    RowRepository,
    StoredItem,
    UploadRepository,
    VectorRepository,
)

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

#: the execution option that marks a write transaction (SQLite: BEGIN IMMEDIATE)
_WRITE = "airoboros_write"


def normalize_url(url: str) -> str:
    """Accept plain sqlite:// and postgresql:// URLs and pick the async driver."""
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url[len("sqlite:///") :]
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+asyncpg://" + url.split("://", 1)[1]
    return url


def _dialect(url: str) -> str:
    return url.split(":", 1)[0].split("+", 1)[0]


def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()
    # The driver would BEGIN only before the first write, after the reads it depends
    # on; _sqlite_begin emits BEGIN itself instead.
    dbapi_conn.isolation_level = None


def _sqlite_begin(conn: Connection) -> None:
    # A write transaction takes the write lock first (waiting for it up to the busy
    # timeout), so what it reads cannot change before it writes; readers are not
    # blocked (WAL).
    immediate = conn.get_execution_options().get(_WRITE, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


class _Database:
    """The engine the repositories share: a read session, a write transaction."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: AsyncEngine | None = None
        self._sessions: async_sessionmaker[AsyncSession] | None = None

    @property
    def dialect(self) -> str:
        return _dialect(self.url)

    def open(self) -> None:
        engine = create_async_engine(self.url, pool_pre_ping=True)
        if self.dialect == "sqlite":
            sync_engine: Engine = engine.sync_engine
            event.listen(sync_engine, "connect", _sqlite_connect)
            event.listen(sync_engine, "begin", _sqlite_begin)
        self.engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)

    async def dispose(self) -> None:
        if self.engine is not None:
            await self.engine.dispose()
            self.engine = None

    def session(self) -> AsyncSession:
        """A session for reading (its transaction is rolled back when it closes)."""
        if self._sessions is None:
            raise RuntimeError("SqlStore.connect() was not called")
        return self._sessions()

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """A session in a write transaction, committed when the block ends normally."""
        async with self.session() as s, s.begin():
            if self.dialect == "sqlite":
                await s.connection(execution_options={_WRITE: True})
            yield s


class SqlStore:
    """The SQL store (``airoboros.store.ports.Store``): every repository over one
    engine. Nothing connects before ``connect``."""

    def __init__(self, url: str) -> None:
        self._db = _Database(normalize_url(url))
        self.jobs: JobRepository = SqlJobs(self._db)
        self.uploads: UploadRepository = SqlUploads(self._db)
        self.progress: ProgressRepository = SqlProgress(self._db)
        self.rows: RowRepository = SqlRows(self._db)
        self.artifacts: ArtifactRepository = SqlArtifacts(self._db)
        self.registry: AdapterRegistry = SqlAdapterRegistry(self._db)
        self.vectors: VectorRepository = SqlVectors(self._db)
        self.dead_letters: DeadLetterRepository = SqlDeadLetters(self._db)

    @property
    def url(self) -> str:
        return self._db.url

    @url.setter
    def url(self, url: str) -> None:
        """Point a closed store at another database (its next ``connect`` opens it)."""
        self._db.url = normalize_url(url)

    @property
    def dialect(self) -> str:
        return self._db.dialect

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
        self._db.open()

    def _safe_url(self) -> str:
        if "@" in self.url:
            scheme, rest = self.url.split("://", 1)
            return f"{scheme}://***@{rest.split('@', 1)[1]}"
        return self.url

    async def close(self) -> None:
        await self._db.dispose()

    async def ping(self) -> bool:
        """Whether the database answers a trivial query within two seconds."""
        try:
            async with asyncio.timeout(2.0), self._db.session() as s:
                await s.execute(text("SELECT 1"))
            return True
        except Exception:
            return False


# --- jobs ---------------------------------------------------------------------------------


class SqlJobs:
    """``JobRepository`` on the ``jobs`` table (and the progress rows a job starts with
    or is resumed from)."""

    def __init__(self, db: _Database) -> None:
        self._db = db

    async def ensure(
        self,
        job_id: str,
        *,
        config: dict[str, Any],
        targets: dict[str, int],
        trace_context: dict[str, str] | None = None,
        owner: str | None = None,
        llm_api_key: str | None = None,
    ) -> JobRecord:
        async with self._db.write() as s:
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
        return await self.get(job_id)

    async def get(self, job_id: str) -> JobRecord:
        async with self._db.session() as s:
            job = await s.get(Job, job_id)
            if job is None:
                raise NotFoundError(f"no job {job_id!r}")
            return _job_record(job)

    async def exists(self, job_id: str) -> bool:
        async with self._db.session() as s:
            return await s.get(Job, job_id) is not None

    async def recent(self, *, limit: int = 100, owner: str | None = None) -> list[JobRecord]:
        q = select(Job).order_by(Job.created_at.desc()).limit(limit)
        if owner is not None:
            q = q.where(Job.owner == owner)
        async with self._db.session() as s:
            return [_job_record(j) for j in (await s.execute(q)).scalars()]

    async def running(self) -> list[str]:
        async with self._db.session() as s:
            return list((await s.execute(select(Job.id).where(Job.status == "running"))).scalars())

    async def set_status(self, job_id: str, status: str, detail: str | None = None) -> None:
        async with self._db.write() as s:
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

    async def request_cancel(self, job_id: str) -> None:
        async with self._db.write() as s:
            res = await s.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
            if res.rowcount == 0:  # type: ignore[attr-defined]
                raise NotFoundError(f"no job {job_id!r}")

    async def resume(self, job_id: str) -> JobRecord:
        async with self._db.write() as s:
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
        return await self.get(job_id)

    async def delete(self, job_id: str) -> None:
        async with self._db.write() as s:
            for table in (Row, Task, ProcessedMessage, DedupeVector, DeadLetterRow, ArtifactRow):
                await s.execute(delete(table).where(table.job_id == job_id))
            # Instructors' own dedupe indexes are namespaced "<job_id>:<instructor>".
            await s.execute(
                delete(DedupeVector).where(DedupeVector.job_id.startswith(job_id + ":"))
            )
            await s.execute(delete(InstructorProgress).where(InstructorProgress.job_id == job_id))
            await s.execute(delete(Job).where(Job.id == job_id))

    async def try_lease(self, job_id: str, owner: str, seconds: float) -> bool:
        now = datetime.now(UTC)
        async with self._db.write() as s:
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
        async with self._db.write() as s:
            await s.execute(
                update(Job)
                .where(Job.id == job_id, Job.lease_owner == owner)
                .values(lease_owner=None, lease_until=None)
            )

    async def set_export(self, job_id: str, uri: str) -> None:
        async with self._db.write() as s:
            await s.execute(update(Job).where(Job.id == job_id).values(export_uri=uri))

    async def set_export_pending(self, job_id: str, pending: bool, error: str | None) -> None:
        async with self._db.write() as s:
            await s.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(export_pending=pending, export_error=error)
            )

    async def pending_exports(self) -> list[str]:
        async with self._db.session() as s:
            q = select(Job.id).where(Job.export_pending.is_(True))
            return list((await s.execute(q)).scalars())

    async def llm_api_key(self, job_id: str) -> str | None:
        async with self._db.session() as s:
            job = await s.get(Job, job_id)
            if job is None:
                raise NotFoundError(f"no job {job_id!r}")
            return job.llm_api_key


class SqlUploads:
    """``UploadRepository`` on the ``uploads`` table."""

    def __init__(self, db: _Database) -> None:
        self._db = db

    async def add(self, upload_id: str, *, owner: str | None, files: list[dict[str, Any]]) -> None:
        async with self._db.write() as s:
            s.add(
                Upload(
                    id=upload_id,
                    owner=owner,
                    files=json.dumps(files),
                    bytes=sum(int(f["bytes"]) for f in files),
                )
            )

    async def get(self, upload_id: str) -> tuple[str | None, list[dict[str, Any]]]:
        async with self._db.session() as s:
            up = await s.get(Upload, upload_id)
            if up is None:
                raise NotFoundError(f"no upload {upload_id!r}")
            return up.owner, json.loads(up.files)


# --- progress -----------------------------------------------------------------------------


async def _progress(
    s: AsyncSession, db: _Database, job_id: str, instructor: str
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
            job_id=job_id, instructor=instructor, **dict.fromkeys(_COUNTERS, 0)
        )
        s.add(prog)
        await s.flush()
    return prog


async def _reserved(
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

    def __init__(self, db: _Database) -> None:
        self._db = db

    async def stats(self, job_id: str) -> dict[str, CategoryCounts]:
        async with self._db.session() as s:
            rows = (
                await s.execute(
                    select(InstructorProgress).where(InstructorProgress.job_id == job_id)
                )
            ).scalars()
            out = {r.instructor: _counts(r) for r in rows}
            for name, held in (await _reserved(s, job_id)).items():
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
                        **{**dict.fromkeys(_COUNTERS, 0), **deltas},
                    )
                )

    async def set_skipped(self, job_id: str, instructor: str, reason: str) -> None:
        async with self._db.write() as s:
            prog = await _progress(s, self._db, job_id, instructor)
            prog.skipped = reason

    async def advance_cursor(self, job_id: str, instructor: str, n: int) -> int:
        async with self._db.write() as s:
            prog = await _progress(s, self._db, job_id, instructor)
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
            prog = await _progress(s, self._db, job_id, instructor)  # locks the count
            task = await s.get(Task, task_id)
            if task is None or task.status != "in_flight":
                return [0] * len(counts)
            held = (await _reserved(s, job_id, instructor=instructor)).get(instructor, 0)
            c = _counts(prog)
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


async def _insert_items(
    s: AsyncSession,
    db: _Database,
    job_id: str,
    items: Sequence[tuple[str, Item]],
    *,
    cap: bool,
) -> list[Row]:
    progs: dict[str, InstructorProgress] = {}
    counts: dict[str, CategoryCounts] = {}
    for _, it in items:
        if it.category not in progs:
            progs[it.category] = await _progress(s, db, job_id, it.category)
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


class SqlRows:
    """``RowRepository`` on ``items``, with the batch commit over ``items``,
    ``artifacts``, ``instructor_stats``, ``tasks``, ``jobs`` and ``processed_messages``."""

    def __init__(self, db: _Database) -> None:
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
                rows = await _insert_items(
                    s,
                    self._db,
                    job_id,
                    [(f"{task_id}:{i}", it) for i, it in enumerate(items)],
                    cap=True,
                )
                prog = await _progress(s, self._db, job_id, instructor)
                made = await _insert_artifacts(s, job_id, prog, artifacts)
                counts = _counts(prog)
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
        return [StoredItem(r.id, _to_item(r)) for r in rows]

    async def add(
        self, job_id: str, items: Sequence[tuple[str, Item]], *, cap: bool = True
    ) -> list[StoredItem]:
        if not items:
            return []
        async with self._db.write() as s:
            rows = await _insert_items(s, self._db, job_id, items, cap=cap)
        return [StoredItem(r.id, _to_item(r)) for r in rows]

    async def count(self, job_id: str) -> int:
        async with self._db.session() as s:
            return int(
                (await s.execute(select(func.count()).where(Row.job_id == job_id))).scalar_one()
            )

    async def count_by_category(self, job_id: str) -> dict[str, int]:
        async with self._db.session() as s:
            result = await s.execute(
                select(Row.category, func.count())
                .where(Row.job_id == job_id)
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
    ) -> AsyncIterator[StoredItem]:
        cursor = after
        while True:
            async with self._db.session() as s:
                q = select(Row).where(Row.job_id == job_id, Row.id > cursor)
                if category is not None:
                    q = q.where(Row.category == category)
                rows = list((await s.execute(q.order_by(Row.id).limit(page_size))).scalars())
            for r in rows:
                yield StoredItem(r.id, _to_item(r))
            if len(rows) < page_size:
                return
            cursor = rows[-1].id

    async def sample(
        self, job_id: str, categories: Sequence[str], n: int, *, unused_by: str | None = None
    ) -> list[StoredItem]:
        if n <= 0 or not categories:
            return []
        q = select(Row).where(Row.job_id == job_id, Row.category.in_(list(categories)))
        if unused_by is not None:
            used = select(Row.response).where(Row.job_id == job_id, Row.category == unused_by)
            q = q.where(Row.response.not_in(used))
        async with self._db.session() as s:
            rows = (await s.execute(q.order_by(func.random()).limit(n))).scalars()
            return [StoredItem(r.id, _to_item(r)) for r in rows]


# --- artifacts ----------------------------------------------------------------------------


async def _insert_artifact(s: AsyncSession, job_id: str, a: Artifact) -> bool:
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
    s: AsyncSession,
    job_id: str,
    prog: InstructorProgress,
    artifacts: Sequence[Artifact],
) -> int:
    """Add artifacts that are new by (kind, name), up to the instructor's target; each
    counts toward it. Returns how many were added."""
    made = 0
    for a in artifacts:
        if _counts(prog).admit_artifact() and await _insert_artifact(s, job_id, a):
            prog.accepted += 1
            made += 1
    return made


class SqlArtifacts:
    """``ArtifactRepository`` on ``artifacts``."""

    def __init__(self, db: _Database) -> None:
        self._db = db

    async def add(
        self, job_id: str, artifacts: Sequence[Artifact], *, count_as: str | None = None
    ) -> int:
        made = 0
        async with self._db.write() as s:
            prog = await _progress(s, self._db, job_id, count_as) if count_as else None
            for a in artifacts:
                if await _insert_artifact(s, job_id, a):
                    made += 1
                    if prog is not None:
                        prog.accepted += 1
        return made

    async def of_kind(self, job_id: str, kind: str) -> list[Artifact]:
        async with self._db.session() as s:
            rows = (
                await s.execute(
                    select(ArtifactRow)
                    .where(ArtifactRow.job_id == job_id, ArtifactRow.kind == kind)
                    .order_by(ArtifactRow.id)
                )
            ).scalars()
            return [Artifact(kind=r.kind, name=r.name, data=json.loads(r.data)) for r in rows]


# --- the adapter registry -----------------------------------------------------------------


async def _adapter(s: AsyncSession, expert: str, version: str) -> AdapterRecord | None:
    q = select(AdapterRecord).where(
        AdapterRecord.expert == expert, AdapterRecord.version == version
    )
    return (await s.execute(q)).scalar_one_or_none()


class SqlAdapterRegistry:
    """``AdapterRegistry`` on ``adapters``."""

    def __init__(self, db: _Database) -> None:
        self._db = db

    async def register(
        self,
        expert: str,
        version: str,
        *,
        base_model: str,
        job_id: str | None = None,
        dataset_uri: str | None = None,
    ) -> None:
        async with self._db.write() as s:
            rec = await _adapter(s, expert, version)
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

    async def finish(
        self,
        expert: str,
        version: str,
        *,
        status: str,
        uri: str | None = None,
        metrics: dict[str, Any] | None = None,
        detail: str | None = None,
    ) -> None:
        async with self._db.write() as s:
            rec = await _adapter(s, expert, version)
            if rec is None:
                raise NotFoundError(f"adapter {expert} {version} is not registered")
            rec.status, rec.uri, rec.detail = status, uri, detail
            rec.metrics = json.dumps(metrics or {})

    async def adapters(
        self, expert: str | None = None, *, job_id: str | None = None
    ) -> list[AdapterInfo]:
        q = select(AdapterRecord).order_by(AdapterRecord.id.desc())
        if expert is not None:
            q = q.where(AdapterRecord.expert == expert)
        if job_id is not None:
            q = q.where(AdapterRecord.job_id == job_id)
        async with self._db.session() as s:
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


# --- dedupe vectors -----------------------------------------------------------------------


class SqlVectors:
    """``VectorRepository`` on ``dedupe_vectors`` (float32 rows as bytes)."""

    def __init__(self, db: _Database) -> None:
        self._db = db

    async def add(self, namespace: str, keys: Sequence[str], vectors: npt.ArrayLike) -> None:
        import numpy as np

        v = np.ascontiguousarray(vectors, dtype=np.float32)
        async with self._db.write() as s:
            existing = set(
                (
                    await s.execute(
                        select(DedupeVector.key).where(
                            DedupeVector.job_id == namespace, DedupeVector.key.in_(list(keys))
                        )
                    )
                ).scalars()
            )
            for key, row in zip(keys, v, strict=True):
                if key not in existing:
                    s.add(DedupeVector(job_id=namespace, key=key, vector=row.tobytes()))

    async def load(
        self, namespace: str, *, after: int = 0
    ) -> tuple[list[int], list[str], npt.NDArray[np.float32]]:
        import numpy as np

        async with self._db.session() as s:
            rows = (
                await s.execute(
                    select(DedupeVector.id, DedupeVector.key, DedupeVector.vector)
                    .where(DedupeVector.job_id == namespace, DedupeVector.id > after)
                    .order_by(DedupeVector.id)
                )
            ).all()
        if not rows:
            return [], [], np.zeros((0, 0), dtype=np.float32)
        vecs = np.stack([np.frombuffer(r[2], dtype=np.float32) for r in rows])
        return [r[0] for r in rows], [r[1] for r in rows], vecs

    async def count(self, namespace: str) -> int:
        async with self._db.session() as s:
            return int(
                (
                    await s.execute(select(func.count()).where(DedupeVector.job_id == namespace))
                ).scalar_one()
            )


# --- dead letters -------------------------------------------------------------------------


class SqlDeadLetters:
    """``DeadLetterRepository`` on ``dead_letters``."""

    def __init__(self, db: _Database) -> None:
        self._db = db

    async def add(
        self,
        *,
        queue: str,
        body: str,
        job_id: str | None,
        message_id: str | None,
        kind: str | None,
        reason: str | None = None,
    ) -> None:
        async with self._db.write() as s:
            s.add(
                DeadLetterRow(
                    queue=queue,
                    body=body,
                    job_id=job_id,
                    message_id=message_id,
                    kind=kind,
                    reason=reason,
                )
            )

    async def for_job(self, job_id: str) -> list[dict[str, Any]]:
        async with self._db.session() as s:
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
                    "reason": r.reason,
                    "created_at": r.created_at.isoformat(),
                }
                for r in rows
            ]


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
