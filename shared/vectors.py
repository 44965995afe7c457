"""Vector store adapters. ``FaissVectorStore`` is the embedded default: exact inner-product
search over unit vectors (so scores are cosine similarities), one index per namespace."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from airoboros.ports import Vectors


class FaissVectorStore:
    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._indexes: dict[str, object] = {}
        self._ids: dict[str, list[str]] = {}
        self._id_set: dict[str, set[str]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def _index(self, namespace: str) -> object:
        import faiss

        if namespace not in self._indexes:
            self._indexes[namespace] = faiss.IndexFlatIP(self.dim)
            self._ids[namespace] = []
            self._id_set[namespace] = set()
        return self._indexes[namespace]

    def _check(self, vectors: Vectors) -> Vectors:
        v = np.ascontiguousarray(vectors, dtype=np.float32)
        if v.ndim != 2 or v.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape [n, {self.dim}], got {v.shape}")
        return v

    async def add(self, namespace: str, ids: Sequence[str], vectors: Vectors) -> None:
        v = self._check(vectors)
        if len(ids) != v.shape[0]:
            raise ValueError("ids and vectors differ in length")
        index = self._index(namespace)
        # Adding an id that is already there is a no-op (a redelivered batch).
        seen = self._id_set[namespace]
        fresh: list[int] = []
        for i, key in enumerate(ids):
            if key not in seen:
                seen.add(key)
                fresh.append(i)
        if not fresh:
            return
        index.add(v[fresh])  # type: ignore[attr-defined]
        self._ids[namespace].extend(ids[i] for i in fresh)

    async def search(
        self, namespace: str, vectors: Vectors, k: int = 1
    ) -> tuple[npt.NDArray[np.float32], list[list[str]]]:
        v = self._check(vectors)
        n = v.shape[0]
        index = self._index(namespace)
        size = int(index.ntotal)  # type: ignore[attr-defined]
        if size == 0 or n == 0:
            return np.full((n, k), -np.inf, dtype=np.float32), [[] for _ in range(n)]
        kk = min(k, size)
        # faiss releases the GIL; large searches run in a thread so the loop stays live.
        if n * size > 1_000_000:
            scores, idx = await asyncio.to_thread(index.search, v, kk)  # type: ignore[attr-defined]
        else:
            scores, idx = index.search(v, kk)  # type: ignore[attr-defined]
        out = np.full((n, k), -np.inf, dtype=np.float32)
        out[:, :kk] = scores
        names = self._ids[namespace]
        return out, [[names[j] for j in row if j >= 0] for row in idx]

    async def count(self, namespace: str) -> int:
        if namespace not in self._indexes:
            return 0
        return int(self._indexes[namespace].ntotal)  # type: ignore[attr-defined]

    async def drop(self, namespace: str) -> None:
        self._indexes.pop(namespace, None)
        self._ids.pop(namespace, None)
        self._id_set.pop(namespace, None)
