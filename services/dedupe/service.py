"""Dedupe: accept a candidate only if nothing already in the dataset, nor an earlier
candidate of the same batch, is as similar as the threshold (cosine)."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence

import numpy as np
from airoboros.contracts import CandidatesProposed, CandidatesScreened, Message
from airoboros.ports import Embedder, VectorStore

log = logging.getLogger(__name__)


class Deduper:
    def __init__(self, embedder: Embedder, vectors: VectorStore) -> None:
        self.embedder = embedder
        self.vectors = vectors
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        return await asyncio.to_thread(self.embedder.embed, list(texts))

    async def screen(
        self, namespace: str, ids: Sequence[str], texts: Sequence[str], threshold: float
    ) -> list[bool]:
        """Accept or reject each text; accepted ones are added to the index at once, so
        the next batch is screened against them. Returns one flag per text."""
        if not texts:
            return []
        vecs = await self.embed(texts)
        # Check-and-add must not interleave with another batch of the same namespace.
        async with self._locks[namespace]:
            best, _ = await self.vectors.search(namespace, vecs, k=1)
            within = vecs @ vecs.T  # [n, n] cosine between batch members
            keep: list[int] = []
            flags: list[bool] = []
            for i in range(len(texts)):
                dup = bool(best[i, 0] >= threshold)
                if not dup and keep:
                    dup = bool(within[i, keep].max() >= threshold)
                flags.append(not dup)
                if not dup:
                    keep.append(i)
            if keep:
                await self.vectors.add(namespace, [ids[i] for i in keep], vecs[keep])
        return flags

    async def restore(
        self, namespace: str, ids: Sequence[str], texts: Sequence[str], chunk: int = 2048
    ) -> None:
        """Rebuild a namespace from rows already in the dataset (on resume)."""
        await self.vectors.drop(namespace)
        for start in range(0, len(texts), chunk):
            vecs = await self.embed(texts[start : start + chunk])
            await self.vectors.add(namespace, ids[start : start + chunk], vecs)


class DedupeService:
    """The queue-facing use case: screen a proposed batch, pass on the survivors."""

    def __init__(self, deduper: Deduper, publish: Callable[[Message], Awaitable[None]]) -> None:
        self.deduper = deduper
        self.publish = publish

    async def on_proposed(self, msg: CandidatesProposed) -> None:
        flags = await self.deduper.screen(
            msg.job_id,
            [c.candidate_id for c in msg.candidates],
            [c.text_for_dedupe() for c in msg.candidates],
            msg.threshold,
        )
        accepted = [c for c, ok in zip(msg.candidates, flags, strict=True) if ok]
        stats = msg.stats.model_copy()
        stats.duplicates += len(flags) - len(accepted)
        await self.publish(
            CandidatesScreened(
                job_id=msg.job_id,
                task_id=msg.task_id,
                instructor=msg.instructor,
                accepted=accepted,
                stats=stats,
                headers=msg.headers,
            )
        )
