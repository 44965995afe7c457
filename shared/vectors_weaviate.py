"""Weaviate vector store: the deployed counterpart of ``airoboros.vectors.FaissVectorStore``.

One Weaviate collection per namespace (a dedupe job), holding the vectors we computed
(no Weaviate vectorizer) under cosine distance.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import grpc
import httpx
import numpy as np
import numpy.typing as npt
import weaviate
from weaviate.classes.config import Configure, DataType, Property, Tokenization, VectorDistances
from weaviate.classes.data import DataObject
from weaviate.classes.init import AdditionalConfig, Auth, Timeout
from weaviate.classes.query import MetadataQuery
from weaviate.collections import Collection
from weaviate.exceptions import (
    UnexpectedStatusCodeError,
    WeaviateBaseError,
    WeaviateStartUpError,
)
from weaviate.util import generate_uuid5

from airoboros.errors import StoreError
from airoboros.ports import Vectors

T = TypeVar("T")

#: The property that carries our id, and the name of the one vector of each collection
#: (named, so that inserts and queries address it explicitly on every server version).
ID_PROPERTY = "item_id"
VECTOR_NAME = "embedding"
#: Objects per insert request: well under gRPC's default 10 MB message limit at
#: 1024 float32 dimensions.
INSERT_CHUNK = 1000
_PREFIX_RE = re.compile(r"^[A-Z][A-Za-z0-9_]*$")


def collection_name(namespace: str, prefix: str = "Dedupe") -> str:
    """The Weaviate collection that holds ``namespace``: ``<prefix>_<32 hex digits>``.

    A hash rather than the namespace itself because Weaviate collection names must match
    ``[A-Z][_0-9A-Za-z]*`` and are capitalised by the server (so ``job-a`` and ``Job_a``
    would both need mangling and could collide). 128 bits make collisions negligible.
    """
    digest = hashlib.sha256(namespace.encode("utf-8")).hexdigest()[:32]
    return f"{prefix}_{digest}"


def item_uuid(item_id: str) -> str:
    """The deterministic object UUID for ``item_id``: adding the same id again overwrites
    the same object (Weaviate's batch insert is an upsert by UUID)."""
    return generate_uuid5(item_id)


class WeaviateVectorStore:
    """``airoboros.ports.VectorStore`` on a Weaviate server (1.27 or later).

    Contract, as for ``FaissVectorStore``:

    - ``search`` returns, per query row, the ``k`` best cosine similarities (``1 -``
      Weaviate's cosine distance), best first, shape [n, k] float32, padded with ``-inf``
      where the namespace holds fewer than ``k`` vectors, and the matching ids (lists of
      length ``min(k, count)``). A namespace that does not exist is empty.
    - ``add`` stores each vector under its id; adding an id again replaces its vector
      (idempotent, so a redelivered message adds nothing twice). Within one call the last
      vector given for an id wins.
    - ``count`` is the number of distinct ids; ``drop`` deletes the namespace (a missing
      one is fine).
    - Shape errors raise ``ValueError`` before anything is sent; every failure of the
      server or the network raises ``StoreError`` naming the URL (never the API key).

    With ``index="hnsw"`` (the default) search is approximate, as Weaviate's HNSW is: on
    small collections it is exact in practice, on large ones a near neighbour can
    occasionally be missed. ``index="flat"`` is exact brute force, like faiss, and fine up
    to a few hundred thousand vectors per namespace.

    Nothing connects in the constructor; the first call connects, and ``close`` lets go.
    """

    def __init__(
        self,
        url: str,
        *,
        grpc_port: int | None = None,
        grpc_host: str | None = None,
        api_key: str | None = None,
        dim: int | None = None,
        collection_prefix: str = "Dedupe",
        index: Literal["hnsw", "flat"] = "hnsw",
        timeout_s: float = 60.0,
        init_timeout_s: float = 10.0,
        query_concurrency: int = 8,
    ) -> None:
        """``url`` is Weaviate's REST address, ``http(s)://host[:port]`` (port default 80
        or 443; Weaviate's own default is 8080, so name it). gRPC goes to ``grpc_host``
        (default: the URL's host) on ``grpc_port`` (default 50051), over TLS when the URL
        is https. ``dim``, if given, is checked on every call. ``query_concurrency`` bounds
        the per-row queries of one ``search`` in flight at once. Raises ``ValueError`` for
        a malformed URL or prefix, or a gRPC address equal to the HTTP one."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"Weaviate URL must look like http://host:8080, got {url!r}")
        if not _PREFIX_RE.match(collection_prefix):
            raise ValueError(
                f"collection_prefix must match [A-Z][A-Za-z0-9_]*, got {collection_prefix!r}"
            )
        self.url = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"  # no userinfo
        self.secure = parts.scheme == "https"
        self.http_host = parts.hostname
        self.http_port = parts.port or (443 if self.secure else 80)
        self.grpc_host = grpc_host or parts.hostname
        self.grpc_port = grpc_port or 50051
        if (self.grpc_host, self.grpc_port) == (self.http_host, self.http_port):
            raise ValueError(
                f"Weaviate's gRPC port must differ from its HTTP port ({self.http_port})"
            )
        self.dim = dim
        self.prefix = collection_prefix
        self.index = index
        self.timeout_s = timeout_s
        self.init_timeout_s = init_timeout_s
        self.query_concurrency = max(1, query_concurrency)
        self._api_key = api_key
        self._client: weaviate.WeaviateClient | None = None
        self._connect_lock = threading.Lock()
        # Collections known to exist, so that add/search need not ask each time. Only
        # touched from worker threads, one set operation at a time (atomic under the GIL).
        self._known: set[str] = set()

    def __repr__(self) -> str:
        return f"WeaviateVectorStore(url={self.url!r}, grpc={self.grpc_host}:{self.grpc_port})"

    # --- plumbing ---------------------------------------------------------------------------

    # Why the sync client in worker threads rather than the async client: the port has no
    # start/close, so the store is built outside any event loop and may be used from more
    # than one (asyncio.run per CLI command, a loop per test). The async client's httpx and
    # grpc.aio channels belong to the loop that opened them; the sync client's channels
    # are thread-safe and loop-agnostic. The cost, a thread per call in flight, is small
    # next to a network round trip.

    def _connect(self) -> weaviate.WeaviateClient:
        client = self._client
        if client is not None:
            return client
        with self._connect_lock:
            if self._client is None:
                self._client = weaviate.connect_to_custom(
                    http_host=self.http_host,
                    http_port=self.http_port,
                    http_secure=self.secure,
                    grpc_host=self.grpc_host,
                    grpc_port=self.grpc_port,
                    grpc_secure=self.secure,
                    auth_credentials=Auth.api_key(self._api_key) if self._api_key else None,
                    # The init checks would ask pypi.org for the client's latest version
                    # (from inside the cluster, on every start) and ping gRPC; a wrong gRPC
                    # port still surfaces, as a StoreError on the first add or search.
                    # The REST check (server version) runs regardless.
                    skip_init_checks=True,
                    additional_config=AdditionalConfig(
                        timeout=Timeout(
                            init=self.init_timeout_s,
                            query=self.timeout_s,
                            insert=self.timeout_s,
                        )
                    ),
                )
            return self._client

    def _error(self, op: str, namespace: str | None, exc: BaseException) -> StoreError:
        where = f"vector store {self.url} (gRPC {self.grpc_host}:{self.grpc_port})"
        what = f"{op} in namespace {namespace!r}" if namespace is not None else op
        detail = str(exc) or type(exc).__name__
        # The client's own messages can be empty ("Details: ."); the root cause is not.
        root = exc
        while (deeper := root.__cause__ or root.__context__) is not None:
            root = deeper
        if root is not exc and str(root) and str(root) not in detail:
            detail = f"{detail.rstrip('. ')} ({type(root).__name__}: {root})"
        if self._api_key:  # belt and braces: no server message should echo it, but
            detail = detail.replace(self._api_key, "***")
        if isinstance(exc, WeaviateStartUpError):
            return StoreError(f"cannot reach {where}: {detail}")
        if isinstance(exc, UnexpectedStatusCodeError) and exc.status_code in (401, 403):
            return StoreError(f"{where}: {what} was refused: check the API key ({detail})")
        return StoreError(f"{where}: {what} failed: {detail}")

    def _guarded(
        self, op: str, namespace: str | None, fn: Callable[[weaviate.WeaviateClient], T]
    ) -> T:
        """Run ``fn(client)`` (blocking), translating client and transport errors."""
        try:
            return fn(self._connect())
        except (WeaviateBaseError, httpx.HTTPError, grpc.RpcError, OSError) as exc:
            if namespace is not None:
                # It may have been dropped elsewhere: ask again next time.
                self._known.discard(collection_name(namespace, self.prefix))
            raise self._error(op, namespace, exc) from exc

    async def _run(
        self, op: str, namespace: str | None, fn: Callable[[weaviate.WeaviateClient], T]
    ) -> T:
        return await asyncio.to_thread(self._guarded, op, namespace, fn)

    def _check(self, vectors: Vectors) -> Vectors:
        v = np.ascontiguousarray(vectors, dtype=np.float32)
        if v.ndim != 2 or (self.dim is not None and v.shape[1] != self.dim):
            want = f"[n, {self.dim}]" if self.dim is not None else "[n, dim]"
            raise ValueError(f"expected vectors of shape {want}, got {v.shape}")
        return v

    def _create_kwargs(self, namespace: str) -> dict[str, Any]:
        """What ``collections.create`` gets for a new namespace (built without a server,
        so a test can check it against the installed client)."""
        index_config = (
            Configure.VectorIndex.flat(distance_metric=VectorDistances.COSINE)
            if self.index == "flat"
            else Configure.VectorIndex.hnsw(distance_metric=VectorDistances.COSINE)
        )
        return {
            # The namespace, for whoever lists collections on the server.
            "description": f"airoboros vectors of namespace {namespace!r}"[:1000],
            "vector_config": Configure.Vectors.self_provided(
                name=VECTOR_NAME, vector_index_config=index_config
            ),
            "properties": [
                Property(
                    name=ID_PROPERTY,
                    data_type=DataType.TEXT,
                    tokenization=Tokenization.FIELD,  # an id is one token, matched whole
                    index_filterable=True,
                    index_searchable=False,
                )
            ],
        }

    def _existing(self, client: weaviate.WeaviateClient, name: str) -> bool:
        if name in self._known:
            return True
        if client.collections.exists(name):
            self._known.add(name)
            return True
        return False

    def _ensure_collection(
        self, client: weaviate.WeaviateClient, namespace: str
    ) -> Collection[Any, Any]:
        name = collection_name(namespace, self.prefix)
        if not self._existing(client, name):
            try:
                client.collections.create(name, **self._create_kwargs(namespace))
            except UnexpectedStatusCodeError:
                # Another replica created it first (Weaviate answers 422 "already
                # exists"); anything else is a real error.
                if not client.collections.exists(name):
                    raise
            self._known.add(name)
        return client.collections.use(name)

    # --- the port ---------------------------------------------------------------------------

    async def add(self, namespace: str, ids: Sequence[str], vectors: Vectors) -> None:
        """Store ``vectors`` (shape [len(ids), dim]) under ``ids``, replacing earlier
        vectors of the same ids."""
        v = self._check(vectors)
        if len(ids) != v.shape[0]:
            raise ValueError("ids and vectors differ in length")
        if not ids:
            return
        # Last occurrence wins, as it would with one add per id.
        last = {item_id: row for row, item_id in enumerate(ids)}
        objects = [
            DataObject(
                properties={ID_PROPERTY: item_id},
                uuid=item_uuid(item_id),
                vector={VECTOR_NAME: v[row].tolist()},
            )
            for item_id, row in last.items()
        ]

        def insert(client: weaviate.WeaviateClient) -> None:
            collection = self._ensure_collection(client, namespace)
            for start in range(0, len(objects), INSERT_CHUNK):
                result = collection.data.insert_many(objects[start : start + INSERT_CHUNK])
                if result.has_errors:
                    first = next(iter(result.errors.values()))
                    raise StoreError(
                        f"vector store {self.url}: add in namespace {namespace!r}: "
                        f"{len(result.errors)} of {len(objects)} vectors were refused, "
                        f"e.g.: {first.message}"
                    )

        await self._run("add", namespace, insert)

    async def search(
        self, namespace: str, vectors: Vectors, k: int = 1
    ) -> tuple[npt.NDArray[np.float32], list[list[str]]]:
        """For each query row, the top-``k`` cosine similarities (shape [n, k], -inf-padded)
        and their ids. Weaviate answers one query vector per request, so the rows go out
        concurrently, at most ``query_concurrency`` at a time."""
        v = self._check(vectors)
        n = v.shape[0]
        scores = np.full((n, k), -np.inf, dtype=np.float32)
        found: list[list[str]] = [[] for _ in range(n)]
        if n == 0 or k <= 0:
            return scores, found
        name = collection_name(namespace, self.prefix)
        if not await self._run("search", namespace, lambda c: self._existing(c, name)):
            return scores, found

        def query(row: int) -> Callable[[weaviate.WeaviateClient], tuple[list[float], list[str]]]:
            def run(client: weaviate.WeaviateClient) -> tuple[list[float], list[str]]:
                result = client.collections.use(name).query.near_vector(
                    near_vector=v[row].tolist(),
                    target_vector=VECTOR_NAME,
                    limit=k,
                    return_metadata=MetadataQuery(distance=True),
                    return_properties=[ID_PROPERTY],
                )
                sims: list[float] = []
                row_ids: list[str] = []
                for o in result.objects:
                    if o.metadata.distance is None:
                        raise StoreError(
                            f"vector store {self.url}: a match came without a distance"
                        )
                    # Weaviate's cosine distance is 1 - cos; we promise similarities.
                    sims.append(1.0 - o.metadata.distance)
                    row_ids.append(str(o.properties[ID_PROPERTY]))
                return sims, row_ids

            return run

        limit = asyncio.Semaphore(self.query_concurrency)

        async def one(row: int) -> None:
            async with limit:
                sims, row_ids = await self._run("search", namespace, query(row))
            # Weaviate returns nearest first; keep that order, as faiss does.
            scores[row, : len(sims)] = sims
            found[row] = row_ids

        await asyncio.gather(*(one(row) for row in range(n)))
        return scores, found

    async def count(self, namespace: str) -> int:
        """The number of ids stored in ``namespace`` (0 if it does not exist)."""
        name = collection_name(namespace, self.prefix)

        def total(client: weaviate.WeaviateClient) -> int:
            if not self._existing(client, name):
                return 0
            result = client.collections.use(name).aggregate.over_all(total_count=True)
            return int(result.total_count or 0)

        return await self._run("count", namespace, total)

    async def drop(self, namespace: str) -> None:
        """Delete the namespace and its vectors; a missing namespace is not an error."""
        name = collection_name(namespace, self.prefix)

        def delete(client: weaviate.WeaviateClient) -> None:
            self._known.discard(name)
            client.collections.delete(name)

        await self._run("drop", namespace, delete)

    async def close(self) -> None:
        """Close the connection (a later call opens a new one)."""
        client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.close)
