"""Dedupe: accept a candidate only if nothing already in the dataset, nor an earlier
candidate of the same batch, is as similar as the threshold (cosine)."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence

import numpy as np

from airoboros import telemetry
from airoboros.contracts import CandidatesProposed, CandidatesScreened, Item, Message
from airoboros.ports import Embedder, VectorStore
from airoboros.store import VectorRepository
from airoboros.vectors import IndexSnapshots

log = logging.getLogger(__name__)

PLAINFORMAT = " PLAINFORMAT"


def dedupe_text(item: Item) -> str:
    """What dedupe embeds for a stored row: its instruction, without the PLAINFORMAT
    suffix of coding rows (a task's PLAINFORMAT twin is still a duplicate)."""
    text = item.instruction
    if item.category == "coding" and text.endswith(PLAINFORMAT):
        text = text[: -len(PLAINFORMAT)]
    return text


class Deduper:
    """Screens candidates of one dataset (a namespace) against everything accepted so far.

    With ``durable`` (the SQL store's vectors), every accepted vector is written there
    before the verdict goes out, and each screen first loads what other processes added
    since: a dedupe replica that takes over a partition, or a restarted run, sees the
    whole dataset. ``screen`` must not run for one namespace in two processes at once; the bus
    partitions the dedupe topic so that it cannot (see ``Bus``).

    With ``snapshots`` (and ``durable``), the first sync of a namespace restores its index
    from the object store and loads only the vectors persisted after it; screens save a new
    snapshot each time the namespace has grown by ``snapshots.every``.
    """

    def __init__(
        self,
        embedder: Embedder,
        vectors: VectorStore,
        durable: VectorRepository | None = None,
        snapshots: IndexSnapshots | None = None,
    ) -> None:
        self.embedder = embedder
        self.vectors = vectors
        self.durable = durable
        self.snapshots = snapshots
        self._restore_tried: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._loaded_up_to: dict[str, int] = {}
        self._known: dict[str, set[str]] = defaultdict(set)

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        return await asyncio.to_thread(self.embedder.embed, list(texts))

    async def sync(self, namespace: str) -> None:
        """Load vectors persisted since the last sync (by any process)."""
        if self.durable is None:
            return
        if self.snapshots is not None and namespace not in self._restore_tried:
            self._restore_tried.add(namespace)
            restored = await self.snapshots.restore(self.vectors, namespace)
            if restored is not None:
                self._loaded_up_to[namespace] = restored.mark
                self._known[namespace] = set(restored.ids)
        seqs, keys, vecs = await self.durable.load(
            namespace, after=self._loaded_up_to.get(namespace, 0)
        )
        if not keys:
            return
        self._loaded_up_to[namespace] = seqs[-1]
        known = self._known[namespace]
        fresh = [i for i, k in enumerate(keys) if k not in known]
        if fresh:
            await self.vectors.add(namespace, [keys[i] for i in fresh], vecs[fresh])
            known.update(keys[i] for i in fresh)

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
            await self.sync(namespace)
            known = self._known[namespace]
            best, _ = await self.vectors.search(namespace, vecs, k=1)
            within = vecs @ vecs.T  # [n, n] cosine between batch members
            keep: list[int] = []
            flags: list[bool] = []
            for i in range(len(texts)):
                if ids[i] in known:
                    # Accepted by an earlier delivery of this batch: the verdict stands.
                    flags.append(True)
                    continue
                dup = bool(best[i, 0] >= threshold)
                if not dup and keep:
                    dup = bool(within[i, keep].max() >= threshold)
                flags.append(not dup)
                if not dup:
                    keep.append(i)
            if keep:
                keys = [ids[i] for i in keep]
                if self.durable is not None:
                    await self.durable.add(namespace, keys, vecs[keep])
                await self.vectors.add(namespace, keys, vecs[keep])
                self._known[namespace].update(keys)
                if self.snapshots is not None and self.durable is not None:
                    mark = self._loaded_up_to.get(namespace, 0)
                    await self.snapshots.maybe_save(self.vectors, namespace, mark)
        return flags

    async def restore(
        self, namespace: str, ids: Sequence[str], texts: Sequence[str], chunk: int = 2048
    ) -> None:
        """Index rows that have no persisted vector yet (an imported dataset)."""
        for start in range(0, len(texts), chunk):
            part_ids = list(ids[start : start + chunk])
            vecs = await self.embed(texts[start : start + chunk])
            if self.durable is not None:
                await self.durable.add(namespace, part_ids, vecs)
            else:
                await self.vectors.add(namespace, part_ids, vecs)
                self._known[namespace].update(part_ids)
        await self.sync(namespace)

    def forget(self, namespace: str) -> None:
        self._loaded_up_to.pop(namespace, None)
        self._known.pop(namespace, None)
        self._restore_tried.discard(namespace)


class DedupeService:
    """The queue-facing use case: screen a proposed batch, pass on the survivors.
    ``deduper`` may still be loading (a future): the first screen waits for it."""

    def __init__(
        self,
        deduper: Deduper | asyncio.Future[Deduper],
        publish: Callable[[Message], Awaitable[None]],
    ) -> None:
        self._deduper = deduper
        self.publish = publish

    async def deduper(self) -> Deduper:
        if not isinstance(self._deduper, Deduper):
            self._deduper = await self._deduper
        return self._deduper

    @telemetry.handles("dedupe", "dedupe")
    async def on_proposed(self, msg: CandidatesProposed) -> None:
        deduper = await self.deduper()
        flags = await deduper.screen(
            msg.namespace or msg.job_id,
            # Keyed by instructor too: the quality report (airoboros.report) tells each
            # category's vectors apart in an index the job's categories share.
            [f"{msg.instructor}:{c.candidate_id}" for c in msg.candidates],
            [c.text_for_dedupe() for c in msg.candidates],
            msg.threshold,
        )
        accepted = [c for c, ok in zip(msg.candidates, flags, strict=True) if ok]
        stats = msg.stats.model_copy()
        stats.duplicates += len(flags) - len(accepted)
        rejected = [c for c, ok in zip(msg.candidates, flags, strict=True) if not ok]
        stats.lost_tokens += sum(c.cost_tokens for c in rejected)
        await self.publish(
            CandidatesScreened(
                job_id=msg.job_id,
                task_id=msg.task_id,
                instructor=msg.instructor,
                accepted=accepted,
                stats=stats,
                settings=msg.settings,
                headers=msg.headers,
            )
        )
