"""Character cards and other artifacts on ``artifacts``, unique by kind and name."""

from __future__ import annotations

import json
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from airoboros.contracts import Artifact
from airoboros.store.models import (
    ArtifactRow,
    InstructorProgress,
)
from airoboros.store.sql.engine import Database
from airoboros.store.sql.progress import counts_of, progress_row


async def insert_artifact(s: AsyncSession, job_id: str, a: Artifact) -> bool:
    """Add one artifact unless one of its kind and name exists; True when added."""
    key = name_key(a.name)
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


async def insert_artifacts(
    s: AsyncSession,
    job_id: str,
    prog: InstructorProgress,
    artifacts: Sequence[Artifact],
) -> int:
    """Add artifacts that are new by (kind, name), up to the instructor's target; each
    counts toward it. Returns how many were added."""
    made = 0
    for a in artifacts:
        if counts_of(prog).admit_artifact() and await insert_artifact(s, job_id, a):
            prog.accepted += 1
            made += 1
    return made


class SqlArtifacts:
    """``ArtifactRepository`` on ``artifacts``."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def add(
        self, job_id: str, artifacts: Sequence[Artifact], *, count_as: str | None = None
    ) -> int:
        made = 0
        async with self._db.write() as s:
            prog = await progress_row(s, self._db, job_id, count_as) if count_as else None
            for a in artifacts:
                if await insert_artifact(s, job_id, a):
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


def name_key(name: str) -> str:
    return " ".join(name.lower().split())[:255]
