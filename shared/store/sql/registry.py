"""The adapter registry on ``adapters``."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from airoboros.errors import NotFoundError
from airoboros.store.models import AdapterRecord
from airoboros.store.ports import AdapterInfo
from airoboros.store.sql.engine import Database


async def adapter_row(s: AsyncSession, expert: str, version: str) -> AdapterRecord | None:
    q = select(AdapterRecord).where(
        AdapterRecord.expert == expert, AdapterRecord.version == version
    )
    return (await s.execute(q)).scalar_one_or_none()


class SqlAdapterRegistry:
    """``AdapterRegistry`` on ``adapters``."""

    def __init__(self, db: Database) -> None:
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
            rec = await adapter_row(s, expert, version)
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
            rec = await adapter_row(s, expert, version)
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
