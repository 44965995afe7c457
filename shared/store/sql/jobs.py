"""Jobs and uploads on ``jobs`` and ``uploads``."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update

from airoboros.errors import NotFoundError
from airoboros.store.models import (
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
from airoboros.store.ports import JobRecord
from airoboros.store.sql.engine import Database
from airoboros.store.sql.progress import COUNTERS, counts_of, write_counts


class SqlJobs:
    """``JobRepository`` on the ``jobs`` table (and the progress rows a job starts with
    or is resumed from)."""

    def __init__(self, db: Database) -> None:
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
                            **{**dict.fromkeys(COUNTERS, 0), "target": target},
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
            return job_record(job)

    async def exists(self, job_id: str) -> bool:
        async with self._db.session() as s:
            return await s.get(Job, job_id) is not None

    async def recent(self, *, limit: int = 100, owner: str | None = None) -> list[JobRecord]:
        q = select(Job).order_by(Job.created_at.desc()).limit(limit)
        if owner is not None:
            q = q.where(Job.owner == owner)
        async with self._db.session() as s:
            return [job_record(j) for j in (await s.execute(q)).scalars()]

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
                c = counts_of(prog)
                c.resume()
                write_counts(prog, c)
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

    def __init__(self, db: Database) -> None:
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


def job_record(job: Job) -> JobRecord:
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
