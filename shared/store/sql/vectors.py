"""Dedupe vectors on ``dedupe_vectors``."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from sqlalchemy import func, select, text

from airoboros.store.models import DedupeVector
from airoboros.store.sql.engine import Database

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt


def lock_key(namespace: str) -> int:
    """The advisory lock key of ``namespace``: a signed 64-bit hash, the same in every
    process (two namespaces that collide only wait for each other)."""
    digest = hashlib.blake2b(f"airoboros.dedupe:{namespace}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class SqlVectors:
    """``VectorRepository`` on ``dedupe_vectors`` (float32 rows as bytes)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @asynccontextmanager
    async def exclusive(self, namespace: str) -> AsyncIterator[None]:
        if self._db.dialect != "postgresql":
            yield
            return
        # A transaction of its own that only holds the lock: the block's loads and adds
        # commit in theirs, before this one ends and lets the next holder in.
        async with self._db.session() as s, s.begin():
            await s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock_key(namespace)})
            yield

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
