"""airoboros.vectors: the approximate index behind FaissVectorStore (switch, exact re-check,
verdict agreement with the flat index) and IndexSnapshots (save, restore, restart)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from airoboros.dedupe.service import Deduper
from airoboros.embeddings import l2_threshold_to_cosine
from airoboros.objects import LocalObjectStore
from airoboros.vectors import FaissVectorStore, IndexSnapshots

DIM = 64
#: min_docsearch_score of the top level and of example-config.yaml's instructors
DEFAULT_THRESHOLDS = [
    l2_threshold_to_cosine(s) for s in (0.35, 0.25, 0.15, 0.1, 0.07, 0.05, 0.04, 0.03, 0.01)
]


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, rng: np.random.Generator, per_cluster: int = 20) -> np.ndarray:
    centers = unit(rng.standard_normal((max(1, n // per_cluster), DIM)))
    noise = rng.standard_normal((n, DIM)) * 0.12
    return unit(centers[rng.integers(0, len(centers), n)] + noise)


def at_cosine(q: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors whose cosine with each row of ``q`` is exactly ``s``."""
    u = rng.standard_normal(q.shape)
    u -= (u * q).sum(1, keepdims=True) * q
    return unit(s * q + np.sqrt(1 - s * s) * unit(u))


def ids(n: int, prefix: str = "v") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


async def test_switches_to_the_approximate_index_past_approx_above() -> None:
    rng = np.random.default_rng(1)
    data = clustered(301, rng)
    vs = FaissVectorStore(DIM, approx_above=300)
    await vs.add("ns", ids(300), data[:300])
    assert not vs.is_approximate("ns")
    await vs.add("ns", ["v300"], data[300:])
    assert vs.is_approximate("ns")
    assert not vs.is_approximate("other")
    assert await vs.count("ns") == 301
    await vs.add("ns", ["v5"], data[5:6])  # a known id stays a no-op
    assert await vs.count("ns") == 301
    scores, found = await vs.search("ns", data[[0, 300]], k=1)
    assert found == [["v0"], ["v300"]]
    assert scores[:, 0] == pytest.approx([1.0, 1.0], abs=1e-5)


async def test_approximate_scores_are_exact_cosines_of_what_was_found() -> None:
    rng = np.random.default_rng(2)
    data = clustered(2000, rng)
    vs = FaissVectorStore(DIM, approx_above=1000)
    await vs.add("ns", ids(2000), data)
    assert vs.is_approximate("ns")
    queries = unit(data[:40] + rng.standard_normal((40, DIM)) * 0.05)
    scores, found = await vs.search("ns", queries, k=5)
    for q, row, names in zip(queries, scores, found, strict=True):
        exact = np.array([q @ data[int(n[1:])] for n in names], dtype=np.float32)
        # The index's 8-bit codes are off by ~1e-3; the re-check makes them exact.
        assert row == pytest.approx(exact, abs=1e-5)
        assert list(row) == sorted(row, reverse=True)


async def test_recheck_catches_the_near_duplicate_that_the_codes_score_below_threshold() -> None:
    """Each query has a stored near-duplicate at cosine 0.9502 and a decoy at 0.9497; at the
    threshold 0.95 the query is a duplicate. Scored by the 8-bit codes alone, the duplicate
    falls below the threshold or behind the decoy for many of them."""
    rng = np.random.default_rng(3)
    n_q = 60
    queries = unit(rng.standard_normal((n_q, DIM)))
    dups, decoys = at_cosine(queries, 0.9502, rng), at_cosine(queries, 0.9497, rng)
    background = unit(rng.standard_normal((1500, DIM)))
    vs = FaissVectorStore(DIM, approx_above=1000)
    await vs.add(
        "ns",
        [*ids(n_q, "dup"), *ids(n_q, "decoy"), *ids(1500)],
        np.vstack([dups, decoys, background]),
    )
    assert vs.is_approximate("ns")
    scores, found = await vs.search("ns", queries, k=1)
    assert [f[0] for f in found] == ids(n_q, "dup")
    assert np.all(scores[:, 0] >= 0.95)


async def test_verdicts_agree_with_the_flat_index_at_the_default_thresholds() -> None:
    rng = np.random.default_rng(4)
    data = clustered(4000, rng)
    # Near-duplicates across the thresholds (cosine ~0.8..1), and fresh rows of the clusters.
    src = data[rng.integers(0, len(data), 600)]
    near = np.vstack(
        [at_cosine(src[i : i + 1], s, rng) for i, s in enumerate(rng.uniform(0.8, 1.0, 600))]
    )
    fresh = clustered(300, rng)
    queries = np.vstack([near, fresh])
    flat = FaissVectorStore(DIM, approx_above=10_000)
    approx = FaissVectorStore(DIM, approx_above=1000)
    for vs in (flat, approx):
        await vs.add("ns", ids(len(data)), data)
    assert approx.is_approximate("ns") and not flat.is_approximate("ns")
    exact, _ = await flat.search("ns", queries, k=1)
    found, _ = await approx.search("ns", queries, k=1)
    verdicts = [(exact[:, 0] >= t) == (found[:, 0] >= t) for t in DEFAULT_THRESHOLDS]
    assert np.mean(verdicts) >= 0.999


# --- snapshots ----------------------------------------------------------------------------


async def test_snapshot_restores_the_index_without_rebuilding_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(5)
    data = clustered(1500, rng)
    one = FaissVectorStore(DIM, approx_above=1000)
    await one.add("job:writing", ids(1500), data)
    snaps = IndexSnapshots(LocalObjectStore(tmp_path), every=1000)
    assert await snaps.save(one, "job:writing", mark=42)
    assert await snaps.objects.list() == ["dedupe-index/job%3Awriting.npz"]

    def no_rebuild(*a: object, **kw: object) -> None:
        raise AssertionError("restoring rebuilt the index")

    monkeypatch.setattr("airoboros.vectors.build_approx", no_rebuild)
    two = FaissVectorStore(DIM, approx_above=1000)
    restored = await IndexSnapshots(LocalObjectStore(tmp_path)).restore(two, "job:writing")
    assert restored is not None
    assert restored.mark == 42 and restored.ids == ids(1500)
    assert two.is_approximate("job:writing") and await two.count("job:writing") == 1500
    queries = unit(data[:30] + rng.standard_normal((30, DIM)) * 0.05)
    assert (await two.search("job:writing", queries, k=3))[1] == (
        await one.search("job:writing", queries, k=3)
    )[1]
    # It goes on growing from there.
    await two.add("job:writing", ["new"], queries[:1])
    assert (await two.search("job:writing", queries[:1], k=1))[1] == [["new"]]
    assert await snaps.restore(two, "no-such-job") is None


async def test_an_unreadable_or_foreign_snapshot_is_ignored(tmp_path: Path) -> None:
    objects = LocalObjectStore(tmp_path)
    snaps = IndexSnapshots(objects)
    await objects.put_bytes(snaps.key("bad"), b"garbage")
    assert await snaps.restore(FaissVectorStore(DIM), "bad") is None
    good = FaissVectorStore(DIM, approx_above=100)
    await good.add("ns", ids(200), unit(np.random.default_rng(8).standard_normal((200, DIM))))
    assert await snaps.save(good, "ns", mark=1)
    whole = await objects.get_bytes(snaps.key("ns"))
    await objects.put_bytes(snaps.key("cut"), whole[: len(whole) // 2])
    assert await snaps.restore(FaissVectorStore(DIM), "cut") is None
    other = FaissVectorStore(DIM + 1)
    await other.add("ns", ["a"], unit(np.ones((1, DIM + 1))))
    assert await snaps.save(other, "ns", mark=1)
    vs = FaissVectorStore(DIM)
    assert await snaps.restore(vs, "ns") is None  # another dimension
    assert await vs.count("ns") == 0


class TableEmbedder:
    """Texts "t<i>" embed to row i of a fixed table."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = table

    @property
    def dim(self) -> int:
        return int(self.table.shape[1])

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.table[[int(t[1:]) for t in texts]]


async def test_a_restarted_deduper_loads_only_the_vectors_persisted_after_its_snapshot(
    tmp_path: Path,
) -> None:
    from airoboros.store import SqlStore

    rng = np.random.default_rng(6)
    table = unit(rng.standard_normal((1400, DIM)))  # random: no two near-duplicates
    near = at_cosine(table[[10, 1250]], 0.99, rng)
    embedder = TableEmbedder(np.vstack([table, near]))  # t1400 ~ t10, t1401 ~ t1250
    store = SqlStore(f"sqlite+aiosqlite:///{tmp_path}/d.sqlite")
    await store.connect()
    snaps = IndexSnapshots(LocalObjectStore(tmp_path / "objects"), every=1000)
    try:
        await store.jobs.ensure("job", config={}, targets={})
        first = Deduper(embedder, FaissVectorStore(DIM, approx_above=500), store.vectors, snaps)
        for start in range(0, 1200, 100):  # the snapshot is written at 1000
            texts = [f"t{i}" for i in range(start, start + 100)]
            assert all(await first.screen("job", texts, texts, 0.9))
        assert await snaps.objects.exists(snaps.key("job"))
        # Another replica adds 200 more after the snapshot (persisted, not snapshotted).
        other = Deduper(embedder, FaissVectorStore(DIM), store.vectors)
        texts = [f"t{i}" for i in range(1200, 1400)]
        assert all(await other.screen("job", texts, texts, 0.9))

        restarted_index = FaissVectorStore(DIM, approx_above=500)
        added: list[int] = []
        real_add = restarted_index.add

        async def counting_add(namespace: str, keys: Sequence[str], vectors: np.ndarray) -> None:
            added.append(len(keys))
            await real_add(namespace, keys, vectors)

        restarted_index.add = counting_add  # type: ignore[method-assign]
        restarted = Deduper(
            embedder, restarted_index, store.vectors, IndexSnapshots(snaps.objects, every=1000)
        )
        # Near-duplicates of a snapshotted row and of a later one are both caught.
        assert await restarted.screen("job", ["x", "y"], ["t1400", "t1401"], 0.9) == [False, False]
        assert await restarted.screen("job", ["z"], ["t0"], 0.9) == [False]
        assert sum(added) <= 400  # the 200 after the snapshot (+ the 200 of its last batches)
        assert await restarted_index.count("job") == 1400
        assert restarted_index.is_approximate("job")
    finally:
        await store.close()


async def test_the_index_is_retrained_as_the_namespace_grows() -> None:
    rng = np.random.default_rng(9)
    data = clustered(2100, rng)
    vs = FaissVectorStore(DIM, approx_above=500, retrain_growth=2.0)
    await vs.add("ns", ids(501), data[:501])
    lists_before = vs._spaces["ns"].index.nlist
    for start in range(501, 2100, 100):  # past 2 x 501: trained again, on more lists
        await vs.add("ns", ids(2100)[start : start + 100], data[start : start + 100])
    assert vs._spaces["ns"].index.nlist > lists_before
    assert vs._spaces["ns"].index.ntotal == 2100
    scores, found = await vs.search("ns", data[[0, 1500, 2099]], k=1)
    assert found == [["v0"], ["v1500"], ["v2099"]]
    assert scores[:, 0] == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)


def test_the_dedupe_settings_read_the_index_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from airoboros.settings import DedupeSettings

    assert DedupeSettings().dedupe_approx_above == 20_000
    assert DedupeSettings().dedupe_snapshot_url is None
    monkeypatch.setenv("AIROBOROS_DEDUPE_APPROX_ABOVE", "5000")
    monkeypatch.setenv("AIROBOROS_DEDUPE_SNAPSHOT_URL", "s3://airoboros")
    settings = DedupeSettings()
    assert settings.dedupe_approx_above == 5000
    assert settings.dedupe_snapshot_url == "s3://airoboros"
    monkeypatch.setenv("AIROBOROS_DEDUPE_APPROX_ABOVE", "0")
    with pytest.raises(ValidationError, match="dedupe_approx_above"):
        DedupeSettings()
