"""airoboros.objects.LocalObjectStore and airoboros.vectors.FaissVectorStore.

The ObjectStore contract (put, get, exists, list, delete, atomic visibility, missing
keys) is held against LocalObjectStore and S3ObjectStore alike in
tests/contract/test_object_store_contract.py; here is what the folder adds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from airoboros.objects import LocalObjectStore
from airoboros.vectors import FaissVectorStore

# --- LocalObjectStore ---------------------------------------------------------------------


async def test_list_on_missing_root_is_empty(tmp_path: Path) -> None:
    assert await LocalObjectStore(tmp_path / "not-yet").list() == []


@pytest.mark.parametrize("key", ["../outside.bin", "a/../../outside.bin", "/etc/passwd", "."])
async def test_key_escaping_the_root_raises(tmp_path: Path, key: str) -> None:
    store = LocalObjectStore(tmp_path / "root")
    with pytest.raises(ValueError, match="escapes"):
        await store.put_bytes(key, b"x")
    with pytest.raises(ValueError):
        await store.get_bytes(key)
    assert not (tmp_path / "outside.bin").exists()


async def test_no_temp_files_left_behind(tmp_path: Path) -> None:
    root = tmp_path / "objects"
    store = LocalObjectStore(root)
    for i in range(5):
        await store.put_bytes(f"dir/obj{i}", bytes([i]) * 1000)
    files = sorted(p.name for p in root.rglob("*") if p.is_file())
    assert files == [f"obj{i}" for i in range(5)]


async def test_from_file_url(tmp_path: Path) -> None:
    store = LocalObjectStore.from_url(f"file://{tmp_path}/objs")
    await store.put_bytes("x", b"1")
    assert (tmp_path / "objs" / "x").read_bytes() == b"1"


# --- FaissVectorStore ---------------------------------------------------------------------

DIM = 4


def unit(*values: float) -> np.ndarray:
    v = np.array([values], dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


async def test_search_on_empty_returns_minus_inf() -> None:
    vs = FaissVectorStore(DIM)
    scores, ids = await vs.search("ns", np.vstack([unit(1, 0, 0, 0), unit(0, 1, 0, 0)]), k=2)
    assert scores.shape == (2, 2)
    assert np.all(np.isneginf(scores))
    assert ids == [[], []]
    assert await vs.count("ns") == 0


async def test_identical_unit_vector_scores_one() -> None:
    vs = FaissVectorStore(DIM)
    a, b = unit(1, 2, 3, 4), unit(4, -1, 0, 2)
    await vs.add("ns", ["a", "b"], np.vstack([a, b]))
    scores, ids = await vs.search("ns", a, k=1)
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert ids == [["a"]]
    scores, ids = await vs.search("ns", b, k=2)
    assert ids[0][0] == "b"
    assert scores[0, 1] == pytest.approx(float((a @ b.T)[0, 0]), abs=1e-5)  # cosine


async def test_k_larger_than_size_pads_with_minus_inf() -> None:
    vs = FaissVectorStore(DIM)
    await vs.add("ns", ["a", "b"], np.vstack([unit(1, 0, 0, 0), unit(0, 1, 0, 0)]))
    scores, ids = await vs.search("ns", unit(1, 1, 0, 0), k=5)
    assert scores.shape == (1, 5)
    assert np.all(np.isfinite(scores[0, :2]))
    assert np.all(np.isneginf(scores[0, 2:]))
    assert sorted(ids[0]) == ["a", "b"]


async def test_namespaces_are_isolated_and_drop_clears_one() -> None:
    vs = FaissVectorStore(DIM)
    await vs.add("job-a", ["a1"], unit(1, 0, 0, 0))
    await vs.add("job-b", ["b1", "b2"], np.vstack([unit(0, 1, 0, 0), unit(0, 0, 1, 0)]))
    assert await vs.count("job-a") == 1
    assert await vs.count("job-b") == 2
    scores, ids = await vs.search("job-b", unit(1, 0, 0, 0), k=1)
    assert ids[0] != ["a1"]
    assert scores[0, 0] == pytest.approx(0.0, abs=1e-5)

    await vs.drop("job-a")
    assert await vs.count("job-a") == 0
    scores, ids = await vs.search("job-a", unit(1, 0, 0, 0), k=1)
    assert np.isneginf(scores[0, 0])
    assert await vs.count("job-b") == 2
    await vs.drop("never-existed")  # harmless


async def test_wrong_dimension_raises() -> None:
    vs = FaissVectorStore(DIM)
    with pytest.raises(ValueError, match="shape"):
        await vs.add("ns", ["x"], np.ones((1, 3), dtype=np.float32))
    with pytest.raises(ValueError):
        await vs.search("ns", np.ones((1, 5), dtype=np.float32))
    with pytest.raises(ValueError):
        await vs.add("ns", ["x"], np.ones(DIM, dtype=np.float32))  # 1-D
    with pytest.raises(ValueError, match="length"):
        await vs.add("ns", ["x", "y"], unit(1, 0, 0, 0))
    assert await vs.count("ns") == 0
