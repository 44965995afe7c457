"""The VectorStore contract, held against FaissVectorStore (always) and WeaviateVectorStore
(when WEAVIATE_URL names a server, e.g. http://localhost:8080; WEAVIATE_GRPC_PORT if gRPC
is not on 50051). What needs no server (names, configuration, input checks, an
unreachable server) runs everywhere.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from airoboros.errors import StoreError
from airoboros.ports import VectorStore
from airoboros.vectors import FaissVectorStore
from airoboros.vectors_weaviate import (
    ID_PROPERTY,
    VECTOR_NAME,
    WeaviateVectorStore,
    collection_name,
    item_uuid,
)

DIM = 4
WEAVIATE_URL = os.environ.get("WEAVIATE_URL")
WEAVIATE_GRPC_PORT = int(os.environ.get("WEAVIATE_GRPC_PORT", "50051"))
needs_weaviate = pytest.mark.skipif(
    not WEAVIATE_URL,
    reason="needs a Weaviate server: set WEAVIATE_URL (e.g. http://localhost:8080) "
    "and, if gRPC is not on 50051, WEAVIATE_GRPC_PORT",
)


def unit(*values: float) -> np.ndarray:
    v = np.array([values], dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# --- the contract, as plain checks on any VectorStore ------------------------------------------


async def check_empty_search_is_minus_inf(vs: VectorStore, ns: str) -> None:
    scores, ids = await vs.search(ns, np.vstack([unit(1, 0, 0, 0), unit(0, 1, 0, 0)]), k=2)
    assert scores.shape == (2, 2)
    assert scores.dtype == np.float32
    assert np.all(np.isneginf(scores))
    assert ids == [[], []]
    assert await vs.count(ns) == 0


async def check_identical_vector_scores_one(vs: VectorStore, ns: str) -> None:
    a, b = unit(1, 2, 3, 4), unit(4, -1, 0, 2)
    await vs.add(ns, ["a", "b"], np.vstack([a, b]))
    scores, ids = await vs.search(ns, a, k=1)
    assert scores.shape == (1, 1)
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert ids == [["a"]]
    # Two query rows at once; each row best first, second score is the cosine.
    scores, ids = await vs.search(ns, np.vstack([b, a]), k=2)
    assert ids == [["b", "a"], ["a", "b"]]
    cos_ab = float((a @ b.T)[0, 0])
    assert scores[0] == pytest.approx([1.0, cos_ab], abs=1e-5)
    assert scores[1] == pytest.approx([1.0, cos_ab], abs=1e-5)


async def check_k_larger_than_size_pads(vs: VectorStore, ns: str) -> None:
    await vs.add(ns, ["a", "b"], np.vstack([unit(1, 0, 0, 0), unit(0, 1, 0, 0)]))
    scores, ids = await vs.search(ns, unit(1, 1, 0, 0), k=5)
    assert scores.shape == (1, 5)
    assert np.all(np.isfinite(scores[0, :2]))
    assert scores[0, :2] == pytest.approx([2**-0.5, 2**-0.5], abs=1e-5)
    assert np.all(np.isneginf(scores[0, 2:]))
    assert sorted(ids[0]) == ["a", "b"]


async def check_namespaces_isolated_and_drop(vs: VectorStore, ns_a: str, ns_b: str) -> None:
    await vs.add(ns_a, ["a1"], unit(1, 0, 0, 0))
    await vs.add(ns_b, ["b1", "b2"], np.vstack([unit(0, 1, 0, 0), unit(0, 0, 1, 0)]))
    assert await vs.count(ns_a) == 1
    assert await vs.count(ns_b) == 2
    scores, ids = await vs.search(ns_b, unit(1, 0, 0, 0), k=1)
    assert ids[0] != ["a1"]
    assert scores[0, 0] == pytest.approx(0.0, abs=1e-5)

    await vs.drop(ns_a)
    assert await vs.count(ns_a) == 0
    scores, ids = await vs.search(ns_a, unit(1, 0, 0, 0), k=1)
    assert np.isneginf(scores[0, 0])
    assert ids == [[]]
    assert await vs.count(ns_b) == 2
    # A dropped namespace can be used again from scratch.
    await vs.add(ns_a, ["a2"], unit(0, 0, 0, 1))
    assert await vs.count(ns_a) == 1
    await vs.drop(f"never-existed-{uuid.uuid4().hex}")  # harmless


async def check_readding_an_id_is_idempotent(vs: VectorStore, ns: str) -> None:
    await vs.add(ns, ["a", "b"], np.vstack([unit(1, 0, 0, 0), unit(0, 1, 0, 0)]))
    # A redelivered message adds the same ids again: nothing may be counted twice.
    await vs.add(ns, ["a", "b"], np.vstack([unit(1, 0, 0, 0), unit(0, 1, 0, 0)]))
    assert await vs.count(ns) == 2
    scores, ids = await vs.search(ns, unit(1, 0, 0, 0), k=3)
    assert ids == [["a", "b"]]
    assert np.isneginf(scores[0, 2])


async def check_wrong_shapes_raise(vs: VectorStore, ns: str) -> None:
    with pytest.raises(ValueError, match="shape"):
        await vs.add(ns, ["x"], np.ones((1, 3), dtype=np.float32))
    with pytest.raises(ValueError):
        await vs.search(ns, np.ones((1, 5), dtype=np.float32))
    with pytest.raises(ValueError):
        await vs.add(ns, ["x"], np.ones(DIM, dtype=np.float32))  # 1-D
    with pytest.raises(ValueError, match="length"):
        await vs.add(ns, ["x", "y"], unit(1, 0, 0, 0))


# --- the backends ---------------------------------------------------------------------------


@dataclass
class Backend:
    name: str
    store: VectorStore
    made: list[str] = field(default_factory=list)

    def ns(self) -> str:
        """A fresh namespace: a real server keeps what earlier runs left."""
        name = f"test-{uuid.uuid4().hex[:12]}"
        self.made.append(name)
        return name


@pytest.fixture(
    params=[
        pytest.param("faiss"),
        # The approximate index (IVF, exact re-check) from the first vector on.
        pytest.param("faiss-approx"),
        pytest.param("weaviate", marks=needs_weaviate),
    ]
)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "faiss":
        yield Backend("faiss", FaissVectorStore(DIM))
        return
    if request.param == "faiss-approx":
        store = FaissVectorStore(DIM, approx_above=1)
        yield Backend("faiss-approx", store)
        return
    assert WEAVIATE_URL
    store = WeaviateVectorStore(WEAVIATE_URL, grpc_port=WEAVIATE_GRPC_PORT, dim=DIM)
    b = Backend("weaviate", store)
    try:
        yield b
    finally:
        for ns in b.made:
            await store.drop(ns)
        await store.close()


async def test_empty_search_is_minus_inf(backend: Backend) -> None:
    await check_empty_search_is_minus_inf(backend.store, backend.ns())


async def test_identical_vector_scores_one(backend: Backend) -> None:
    await check_identical_vector_scores_one(backend.store, backend.ns())


async def test_k_larger_than_size_pads(backend: Backend) -> None:
    await check_k_larger_than_size_pads(backend.store, backend.ns())


async def test_namespaces_isolated_and_drop(backend: Backend) -> None:
    await check_namespaces_isolated_and_drop(backend.store, backend.ns(), backend.ns())


async def test_readding_an_id_is_idempotent(backend: Backend) -> None:
    await check_readding_an_id_is_idempotent(backend.store, backend.ns())


async def test_wrong_shapes_raise(backend: Backend) -> None:
    ns = backend.ns()
    await check_wrong_shapes_raise(backend.store, ns)
    assert await backend.store.count(ns) == 0


@needs_weaviate
async def test_weaviate_many_query_rows_and_last_duplicate_wins() -> None:
    assert WEAVIATE_URL
    store = WeaviateVectorStore(
        WEAVIATE_URL, grpc_port=WEAVIATE_GRPC_PORT, dim=DIM, query_concurrency=3
    )
    ns = f"test-{uuid.uuid4().hex[:12]}"
    try:
        rng = np.random.default_rng(0)
        vecs = rng.normal(size=(20, DIM)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        ids = [f"id{i}" for i in range(20)]
        # "id0" twice in one call: the last vector given wins.
        await store.add(ns, [*ids, "id0"], np.vstack([vecs, vecs[1:2]]))
        assert await store.count(ns) == 20
        scores, found = await store.search(ns, vecs, k=1)
        assert [row[0] for row in found[2:]] == ids[2:]
        assert scores[1:, 0] == pytest.approx(np.ones(19), abs=1e-5)
        assert found[1][0] in ("id0", "id1")  # id0 now holds id1's vector: a tie
        assert scores[0, 0] < 1 - 1e-3  # and vecs[0] is stored nowhere any more
    finally:
        await store.drop(ns)
        await store.close()


# --- what needs no Weaviate server ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_collection_names_are_valid_and_distinct() -> None:
    names = {collection_name(ns) for ns in ["job-a", "Job_a", "job a", "ジョブ", "", "x" * 500]}
    assert len(names) == 6
    for name in names:
        assert re.fullmatch(r"Dedupe_[0-9a-f]{32}", name)
    assert collection_name("job-a") == collection_name("job-a")
    assert collection_name("job-a", "Test").startswith("Test_")


def test_item_uuid_is_deterministic() -> None:
    assert item_uuid("cand-1") == item_uuid("cand-1")
    assert item_uuid("cand-1") != item_uuid("cand-2")
    uuid.UUID(item_uuid("cand-1"))  # a valid UUID


@pytest.mark.parametrize("index", ["hnsw", "flat"])
def test_collection_config_is_cosine_without_vectorizer(index: str) -> None:
    from weaviate.classes.config import VectorDistances, Vectorizers

    store = WeaviateVectorStore("http://localhost:8080", index=index)  # type: ignore[arg-type]
    kw = store._create_kwargs("job-1")
    vc = kw["vector_config"]
    assert vc.name == VECTOR_NAME
    assert vc.vectorizer.vectorizer == Vectorizers.NONE
    assert vc.vectorIndexConfig.distance == VectorDistances.COSINE
    assert vc.vectorIndexConfig.vector_index_type().value == index
    assert [p.name for p in kw["properties"]] == [ID_PROPERTY]
    assert "job-1" in kw["description"]


def test_url_parsing() -> None:
    s = WeaviateVectorStore(
        "https://user:pw@weaviate.example", grpc_host="grpc-weaviate.example", grpc_port=443
    )
    assert (s.http_host, s.http_port, s.secure) == ("weaviate.example", 443, True)
    assert (s.grpc_host, s.grpc_port) == ("grpc-weaviate.example", 443)
    assert s.url == "https://weaviate.example"
    t = WeaviateVectorStore("http://weaviate:8080")
    assert (t.http_port, t.grpc_host, t.grpc_port, t.secure) == (8080, "weaviate", 50051, False)
    for bad in ["weaviate:8080", "grpc://weaviate:50051", "http://"]:
        with pytest.raises(ValueError, match="Weaviate URL"):
            WeaviateVectorStore(bad)
    with pytest.raises(ValueError, match="gRPC port must differ"):
        WeaviateVectorStore("http://weaviate:8080", grpc_port=8080)
    with pytest.raises(ValueError, match="collection_prefix"):
        WeaviateVectorStore("http://weaviate:8080", collection_prefix="lower")


async def test_weaviate_shape_errors_need_no_server() -> None:
    # Nothing listens there: the checks must fail before any connection is tried.
    port = _free_port()
    store = WeaviateVectorStore(f"http://127.0.0.1:{port}", grpc_port=_free_port(), dim=DIM)
    await check_wrong_shapes_raise(store, "ns")
    await store.add("ns", [], np.zeros((0, DIM), dtype=np.float32))  # nothing to send
    scores, ids = await store.search("ns", np.zeros((0, DIM), dtype=np.float32), k=3)
    assert scores.shape == (0, 3)
    assert ids == []


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.count("ns"),
        lambda s: s.search("ns", unit(1, 0, 0, 0), k=1),
        lambda s: s.add("ns", ["a"], unit(1, 0, 0, 0)),
        lambda s: s.drop("ns"),
    ],
)
async def test_unreachable_weaviate_is_a_store_error(
    call: Callable[[WeaviateVectorStore], object],
) -> None:
    port = _free_port()
    store = WeaviateVectorStore(
        f"http://127.0.0.1:{port}",
        grpc_port=_free_port(),
        api_key="sk-weaviate-secret",
        dim=DIM,
    )
    with pytest.raises(StoreError) as err:
        await call(store)  # type: ignore[misc]
    msg = str(err.value)
    assert msg.startswith(f"cannot reach vector store http://127.0.0.1:{port}"), msg
    assert "sk-weaviate-secret" not in msg
    assert "sk-weaviate-secret" not in repr(store)
    await store.close()
