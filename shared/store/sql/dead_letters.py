"""Dead-lettered messages on ``dead_letters``."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from airoboros.store.models import DeadLetterRow
from airoboros.store.sql.engine import Database

# --- dead letters -------------------------------------------------------------------------


class SqlDeadLetters:
    """``DeadLetterRepository`` on ``dead_letters``."""

    def __init__(self, db: Database) -> None:
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
