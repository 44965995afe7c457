"""Dedupe: accept a candidate only if nothing already in the dataset, nor an earlier
candidate of the same batch, is as similar as the threshold (cosine)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

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


@dataclass(eq=False)
class _Request:
    """One ``screen`` call on its way through the embedding batch and the check."""

    namespace: str
    ids: list[str]
    texts: list[str]
    threshold: float
    future: asyncio.Future[list[bool]]
    vecs: np.ndarray | None = None


class Deduper:
    """Screens candidates of one dataset (a namespace) against everything accepted so far.

    A sequencer with parallel embedding in front of one check-and-insert: ``screen``
    calls are embedded together (one forward pass for the texts of several messages and
    jobs, gathered for up to ``batch_wait`` seconds or ``batch_texts`` texts), outside any
    lock; then, per namespace, the check runs under the namespace's lock: an asyncio lock
    in this process and, with ``durable``, ``durable.exclusive(namespace)`` across
    processes (a PostgreSQL advisory lock). Under it the deduper loads what other
    processes added since its last look (``sync``), checks the batch against the index
    and itself, writes the accepted vectors durably and only then lets go and answers. So
    several replicas may screen one namespace at once and two near-duplicates can still
    never both be accepted: of two racing batches, the second to take the lock sees the
    first's vectors. A candidate whose id the namespace already holds (a redelivery, by
    this replica or another) keeps its verdict: accepted.

    With ``exclusive`` the cross-process lock is given directly (Weaviate, which holds
    the vectors itself: ``durable`` is None there but replicas still take turns).

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
        *,
        exclusive: Callable[[str], AbstractAsyncContextManager[None]] | None = None,
        batch_wait: float = 0.0,
        batch_texts: int = 256,
    ) -> None:
        self.embedder = embedder
        self.vectors = vectors
        self.durable = durable
        self.snapshots = snapshots
        self._restore_tried: set[str] = set()
        self.exclusive = exclusive or (durable.exclusive if durable is not None else None)
        #: seconds the first request of an embedding batch waits for others to join it
        self.batch_wait = batch_wait
        #: most texts in one embedding batch (a larger request is embedded alone)
        self.batch_texts = max(1, batch_texts)
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._loaded_up_to: dict[str, int] = {}
        self._known: dict[str, set[str]] = defaultdict(set)
        self._pending: list[_Request] = []
        self._pending_texts = 0
        self._full: asyncio.Event | None = None
        self._runner: asyncio.Task[None] | None = None
        self._checks: set[asyncio.Task[None]] = set()
        #: embedding calls made and texts embedded (for the benchmarks)
        self.embed_calls = 0
        self.embedded_texts = 0

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.embed_calls += 1
        self.embedded_texts += len(texts)
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
        loop = asyncio.get_running_loop()
        request = _Request(namespace, list(ids), list(texts), threshold, loop.create_future())
        self._pending.append(request)
        self._pending_texts += len(request.texts)
        if self._full is None:
            self._full = asyncio.Event()
        if self._pending_texts >= self.batch_texts:
            self._full.set()
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        return await request.future

    # --- the sequencer ----------------------------------------------------------------

    async def _run(self) -> None:
        """Embed the pending requests batch after batch (one embedding at a time: the
        requests that arrive during one form the next), and hand each batch's requests,
        per namespace, to a check of their own, so embedding goes on while they wait for
        their lock."""
        while self._pending:
            await self._gather()
            batch = self._take()
            try:
                vecs = await self.embed([t for r in batch for t in r.texts])
            except Exception as exc:
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(exc)
                continue
            start = 0
            groups: dict[str, list[_Request]] = defaultdict(list)
            for r in batch:
                r.vecs = vecs[start : start + len(r.texts)]
                start += len(r.texts)
                groups[r.namespace].append(r)
            for namespace, requests in groups.items():
                task = asyncio.create_task(self._check_group(namespace, requests))
                self._checks.add(task)
                task.add_done_callback(self._checks.discard)

    async def _gather(self) -> None:
        """Wait up to ``batch_wait`` for the batch to fill (not at all when it is full)."""
        if self.batch_wait <= 0 or self._pending_texts >= self.batch_texts:
            return
        assert self._full is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._full.wait(), self.batch_wait)

    def _take(self) -> list[_Request]:
        batch: list[_Request] = []
        n = 0
        while self._pending and (not batch or n + len(self._pending[0].texts) <= self.batch_texts):
            r = self._pending.pop(0)
            n += len(r.texts)
            if not r.future.done():  # not given up (cancelled) meanwhile
                batch.append(r)
        self._pending_texts -= n
        assert self._full is not None
        if self._pending_texts < self.batch_texts:
            self._full.clear()
        return batch

    async def _check_group(self, namespace: str, requests: list[_Request]) -> None:
        try:
            flags = await self._check(namespace, requests)
        except BaseException as exc:
            for r in requests:
                if not r.future.done():
                    r.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for r, f in zip(requests, flags, strict=True):
            if not r.future.done():
                r.future.set_result(f)

    async def _check(self, namespace: str, requests: list[_Request]) -> list[list[bool]]:
        """Check-and-insert for the requests of one namespace, in order, as if they were
        one batch: each candidate against the index and the ones accepted before it."""
        vecs = np.concatenate([r.vecs for r in requests if r.vecs is not None])
        ids = [i for r in requests for i in r.ids]
        thresholds = [r.threshold for r in requests for _ in r.ids]
        exclusive = (
            self.exclusive(namespace) if self.exclusive is not None else contextlib.nullcontext()
        )
        # Check-and-add must not interleave with another batch of the same namespace, in
        # this process (asyncio lock, taken first so that one process waits on the
        # database's lock with one connection only) or in another (``exclusive``).
        async with self._locks[namespace], exclusive:
            await self.sync(namespace)
            known = self._known[namespace]
            best, found = await self.vectors.search(namespace, vecs, k=1)
            within = vecs @ vecs.T  # [n, n] cosine between batch members
            keep: list[int] = []
            kept: set[str] = set()
            flags: list[bool] = []
            for i in range(len(ids)):
                if ids[i] in known or ids[i] in kept or found[i][:1] == [ids[i]]:
                    # Accepted by an earlier delivery of this batch (here, or by another
                    # replica, or in a shared Weaviate): the verdict stands.
                    flags.append(True)
                    continue
                dup = bool(best[i, 0] >= thresholds[i])
                if not dup and keep:
                    dup = bool(within[i, keep].max() >= thresholds[i])
                flags.append(not dup)
                if not dup:
                    keep.append(i)
                    kept.add(ids[i])
            if keep:
                keys = [ids[i] for i in keep]
                if self.durable is not None:
                    await self.durable.add(namespace, keys, vecs[keep])
                await self.vectors.add(namespace, keys, vecs[keep])
                known.update(keys)
                if self.snapshots is not None and self.durable is not None:
                    mark = self._loaded_up_to.get(namespace, 0)
                    await self.snapshots.maybe_save(self.vectors, namespace, mark)
        out: list[list[bool]] = []
        start = 0
        for r in requests:
            out.append(flags[start : start + len(r.ids)])
            start += len(r.ids)
        return out

    async def restore(
        self, namespace: str, ids: Sequence[str], texts: Sequence[str], chunk: int = 2048
    ) -> None:
        """Index rows that have no persisted vector yet (an imported dataset)."""
        for start in range(0, len(texts), chunk):
            part_ids = list(ids[start : start + chunk])
            vecs = await self.embed(texts[start : start + chunk])
            if self.durable is not None:
                exclusive = (
                    self.exclusive(namespace)
                    if self.exclusive is not None
                    else contextlib.nullcontext()
                )
                async with self._locks[namespace], exclusive:
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
