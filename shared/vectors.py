"""Vector store adapters. ``FaissVectorStore`` is the embedded default: inner-product search
over unit vectors (so scores are cosine similarities), one index per namespace.

A namespace starts on an exact flat index (``IndexFlatIP``). Once it holds more than
``approx_above`` vectors it switches to an approximate one: an inverted file over 8-bit
scalar-quantised codes (``IndexIVFScalarQuantizer``, ``nlist = 2 * sqrt(n)`` lists,
``nprobe`` of them searched), chosen over HNSW by measurement (docs/architecture.md,
"Dedupe at scale"). The approximate index only proposes ``candidates`` ids per query; their
scores are recomputed exactly against the float vectors the namespace keeps, so ``search``
always returns exact cosines of what it found, and a near-duplicate that the 8-bit scores
rank second is still found first. The index is re-trained when the namespace has grown
``retrain_growth`` times past the size it was trained on (lists stay short).

``IndexSnapshots`` saves a namespace (index, float vectors, ids and the durable sequence
number it covers) to the object store and restores it, so a restarted dedupe process
neither re-embeds nor rebuilds: it loads only the vectors persisted after the snapshot.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import numpy as np
import numpy.typing as npt

from airoboros.errors import NotFoundError
from airoboros.ports import ObjectStore, Vectors, VectorStore

log = logging.getLogger(__name__)

#: vectors in a namespace above which it is searched by the approximate index
DEFAULT_APPROX_ABOVE = 20_000
#: candidates the approximate index proposes per query for the exact re-check
DEFAULT_CANDIDATES = 16
#: inverted lists searched per query
DEFAULT_NPROBE = 32
SNAPSHOT_VERSION = 1


def _faiss() -> Any:
    import faiss

    return faiss


class _Space:
    """One namespace: ids, the float vectors (for the exact re-check and the snapshot) and
    the index searched (flat, or the approximate one once large)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.ids: list[str] = []
        self.id_set: set[str] = set()
        self._buf = np.empty((0, dim), dtype=np.float32)
        self.n = 0
        self.index: Any = _faiss().IndexFlatIP(dim)
        self.approx = False
        self.trained_on = 0

    @property
    def vectors(self) -> npt.NDArray[np.float32]:
        return self._buf[: self.n]

    def append(self, ids: Sequence[str], v: npt.NDArray[np.float32]) -> None:
        need = self.n + v.shape[0]
        if need > self._buf.shape[0]:
            grown = np.empty((max(need, 2 * self._buf.shape[0], 1024), self.dim), np.float32)
            grown[: self.n] = self._buf[: self.n]
            self._buf = grown
        self._buf[self.n : need] = v
        self.n = need
        self.ids.extend(ids)
        self.id_set.update(ids)


def build_approx(vectors: npt.NDArray[np.float32], nprobe: int = DEFAULT_NPROBE) -> Any:
    """An IVF index over 8-bit codes of ``vectors`` (inner product), trained on a sample."""
    faiss = _faiss()
    n, dim = vectors.shape
    nlist = max(1, min(int(2 * math.sqrt(n)), n // 16))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFScalarQuantizer(
        quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
    )
    index.cp.niter = 10
    index.cp.max_points_per_centroid = 16  # sample 16 * nlist points: enough for dedupe
    index.cp.min_points_per_centroid = 4  # (faiss warns below 39 per list; 16 do here)
    sample = vectors
    if n > 16 * nlist:
        rng = np.random.default_rng(0)
        sample = vectors[np.sort(rng.choice(n, 16 * nlist, replace=False))]
    index.train(sample)
    index.add(vectors)
    index.nprobe = nprobe
    return index


class FaissVectorStore:
    def __init__(
        self,
        dim: int,
        *,
        approx_above: int = DEFAULT_APPROX_ABOVE,
        candidates: int = DEFAULT_CANDIDATES,
        nprobe: int = DEFAULT_NPROBE,
        retrain_growth: float = 4.0,
    ) -> None:
        if approx_above < 1 or candidates < 1 or nprobe < 1 or retrain_growth <= 1:
            raise ValueError("approx_above, candidates, nprobe must be >= 1, retrain_growth > 1")
        self.dim = dim
        self.approx_above = approx_above
        self.candidates = candidates
        self.nprobe = nprobe
        self.retrain_growth = retrain_growth
        self._spaces: dict[str, _Space] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def _space(self, namespace: str) -> _Space:
        if namespace not in self._spaces:
            self._spaces[namespace] = _Space(self.dim)
        return self._spaces[namespace]

    def _lock(self, namespace: str) -> asyncio.Lock:
        return self._locks.setdefault(namespace, asyncio.Lock())

    def _check(self, vectors: Vectors) -> Vectors:
        v = np.ascontiguousarray(vectors, dtype=np.float32)
        if v.ndim != 2 or v.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape [n, {self.dim}], got {v.shape}")
        return v

    def is_approximate(self, namespace: str) -> bool:
        """Whether ``namespace`` is searched by the approximate index."""
        space = self._spaces.get(namespace)
        return bool(space and space.approx)

    async def add(self, namespace: str, ids: Sequence[str], vectors: Vectors) -> None:
        v = self._check(vectors)
        if len(ids) != v.shape[0]:
            raise ValueError("ids and vectors differ in length")
        async with self._lock(namespace):
            space = self._space(namespace)
            # Adding an id that is already there is a no-op (a redelivered batch).
            fresh: list[int] = []
            batch: set[str] = set()
            for i, key in enumerate(ids):
                if key not in space.id_set and key not in batch:
                    batch.add(key)
                    fresh.append(i)
            if not fresh:
                return
            new = v[fresh]
            space.append([ids[i] for i in fresh], new)
            rebuild = (not space.approx and space.n > self.approx_above) or (
                space.approx and space.n > self.retrain_growth * space.trained_on
            )
            if rebuild:
                # Training and adding a large namespace takes seconds: off the loop.
                space.index = await asyncio.to_thread(build_approx, space.vectors, self.nprobe)
                space.approx, space.trained_on = True, space.n
            elif new.shape[0] * space.n > 1_000_000:
                await asyncio.to_thread(space.index.add, new)
            else:
                space.index.add(new)

    async def search(
        self, namespace: str, vectors: Vectors, k: int = 1
    ) -> tuple[npt.NDArray[np.float32], list[list[str]]]:
        v = self._check(vectors)
        n = v.shape[0]
        space = self._spaces.get(namespace)
        if space is None or space.n == 0 or n == 0:
            return np.full((n, k), -np.inf, dtype=np.float32), [[] for _ in range(n)]
        kk = min(k, space.n)
        out = np.full((n, k), -np.inf, dtype=np.float32)
        # Not while an add changes the index (faiss indexes are not safe to share then).
        async with self._lock(namespace):
            if space.approx:
                scores, idx = await asyncio.to_thread(self._search_approx, space, v, kk)
            elif n * space.n > 1_000_000:
                # faiss releases the GIL; large searches run in a thread: the loop stays live.
                scores, idx = await asyncio.to_thread(space.index.search, v, kk)
            else:
                scores, idx = space.index.search(v, kk)
            out[:, :kk] = scores
            return out, [[space.ids[j] for j in row if j >= 0] for row in idx]

    def _search_approx(
        self, space: _Space, v: npt.NDArray[np.float32], k: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """The approximate index's candidates, re-scored exactly and re-ranked."""
        c = min(max(k, self.candidates), space.n)
        _, cand = space.index.search(v, c)
        found = cand >= 0
        rows = space.vectors[np.where(found, cand, 0)]  # [n, c, dim]
        exact = np.einsum("nd,ncd->nc", v, rows, dtype=np.float32)
        exact[~found] = -np.inf
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        scores = np.take_along_axis(exact, order, axis=1)
        idx = np.take_along_axis(cand, order, axis=1)
        idx[~np.isfinite(scores)] = -1
        return scores, idx

    async def count(self, namespace: str) -> int:
        space = self._spaces.get(namespace)
        return 0 if space is None else space.n

    async def drop(self, namespace: str) -> None:
        self._spaces.pop(namespace, None)

    # --- snapshots (see IndexSnapshots) -----------------------------------------------

    async def dump(self, namespace: str, **extra: int) -> bytes | None:
        """The namespace as one blob (index, vectors, ids, and ``extra`` in its header);
        None when it is empty."""
        async with self._lock(namespace):
            space = self._spaces.get(namespace)
            if space is None or space.n == 0:
                return None
            return await asyncio.to_thread(_dump, space, extra)

    async def load(self, namespace: str, blob: bytes) -> tuple[list[str], dict[str, Any]]:
        """Replace the namespace by a ``dump``; returns its ids and header. ValueError if
        the blob is not a snapshot of this dimension."""
        space, meta = await asyncio.to_thread(_undump, blob, self.dim, self.nprobe)
        async with self._lock(namespace):
            self._spaces[namespace] = space
        return list(space.ids), meta


def _dump(space: _Space, extra: dict[str, int]) -> bytes:
    meta: dict[str, Any] = {**extra, "version": SNAPSHOT_VERSION, "dim": space.dim}
    meta.update(n=space.n, approx=space.approx, trained_on=space.trained_on)
    arrays: dict[str, Any] = {
        "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
        "ids": np.frombuffer(json.dumps(space.ids).encode(), dtype=np.uint8),
        "vectors": space.vectors,
    }
    if space.approx:
        arrays["index"] = _faiss().serialize_index(space.index)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _undump(blob: bytes, dim: int, nprobe: int) -> tuple[_Space, dict[str, Any]]:
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
            ids = json.loads(z["ids"].tobytes())
            vectors = np.ascontiguousarray(z["vectors"], dtype=np.float32)
            index = z["index"] if "index" in z.files else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"not a vector snapshot: {exc}") from exc
    if meta.get("version") != SNAPSHOT_VERSION or meta.get("dim") != dim:
        raise ValueError(f"snapshot of version {meta.get('version')}, dim {meta.get('dim')}")
    if vectors.shape != (len(ids), dim) or meta.get("n") != len(ids):
        raise ValueError("snapshot ids and vectors disagree")
    space = _Space(dim)
    space.append(ids, vectors)
    if index is not None:
        try:
            space.index = _faiss().deserialize_index(index)
        except RuntimeError as exc:
            raise ValueError(f"not a faiss index: {exc}") from exc
        space.index.nprobe = nprobe
        if space.index.ntotal != len(ids):
            raise ValueError("snapshot index and ids disagree")
        space.approx, space.trained_on = True, int(meta["trained_on"])
    else:
        space.index.add(vectors)
    return space, meta


@dataclass
class Restored:
    """A namespace restored from a snapshot: the durable sequence number it covers (load
    only what was persisted after it) and its ids."""

    mark: int
    ids: list[str]


class IndexSnapshots:
    """Snapshots of ``FaissVectorStore`` namespaces in an object store, one object per
    namespace (``<prefix><namespace>.npz``, written atomically) with the sequence number of
    the durable store (``VectorRepository``) it covers. Other vector stores are skipped:
    Weaviate keeps its own index."""

    def __init__(self, objects: ObjectStore, *, every: int = 50_000, prefix: str = "dedupe-index/"):
        if every < 1:
            raise ValueError("every must be >= 1")
        self.objects = objects
        self.every = every
        self.prefix = prefix
        self._saved: dict[str, int] = {}

    def key(self, namespace: str) -> str:
        return f"{self.prefix}{quote(namespace, safe='')}.npz"

    async def save(self, store: VectorStore, namespace: str, mark: int) -> bool:
        """Write the namespace's snapshot, covering the durable store up to ``mark``; the
        caller holds the namespace still (the dedupe lock) so ids and mark agree."""
        if not isinstance(store, FaissVectorStore):
            return False
        blob = await store.dump(namespace, mark=mark)
        if blob is None:
            return False
        count = await store.count(namespace)
        await self.objects.put_bytes(self.key(namespace), blob)
        self._saved[namespace] = count
        log.info("saved the dedupe index of %s (%d vectors, mark %d)", namespace, count, mark)
        return True

    async def maybe_save(self, store: VectorStore, namespace: str, mark: int) -> bool:
        """``save`` once the namespace has grown by ``every`` vectors since the last one."""
        count = await store.count(namespace)
        if count - self._saved.get(namespace, 0) < self.every:
            return False
        return await self.save(store, namespace, mark)

    async def restore(self, store: VectorStore, namespace: str) -> Restored | None:
        """Load the namespace's snapshot into ``store``; None when there is none or it is
        unreadable (logged: the caller then loads every vector from the durable store)."""
        if not isinstance(store, FaissVectorStore):
            return None
        try:
            data = await self.objects.get_bytes(self.key(namespace))
        except NotFoundError:
            return None
        try:
            ids, meta = await store.load(namespace, data)
            mark = int(meta["mark"])
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring the dedupe index snapshot of %s: %s", namespace, exc)
            return None
        self._saved[namespace] = len(ids)
        log.info("restored the dedupe index of %s (%d vectors)", namespace, len(ids))
        return Restored(mark, ids)

    async def delete(self, namespace: str) -> None:
        await self.objects.delete(self.key(namespace))
        self._saved.pop(namespace, None)
