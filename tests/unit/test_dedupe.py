"""airoboros.dedupe.service.Deduper with the real all-MiniLM-L6-v2 embedder and faiss."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from airoboros.dedupe.service import Deduper
from airoboros.embeddings import SentenceTransformerEmbedder, l2_threshold_to_cosine
from airoboros.vectors import FaissVectorStore

THRESHOLD = 0.8
CAKE = "How do I bake a chocolate cake at home?"
CAKE_PARAPHRASE = "What is the recipe for making a chocolate cake at home?"
REVOLUTION = "Explain the causes of the French Revolution."
LINKED_LIST = "Write a python function that reverses a linked list."
CAPITAL = "What is the capital city of Australia?"


@pytest.fixture(scope="module")
def embedder() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder()


@pytest.fixture
def deduper(embedder: SentenceTransformerEmbedder) -> Deduper:
    return Deduper(embedder, FaissVectorStore(embedder.dim))


def test_l2_threshold_to_cosine() -> None:
    assert l2_threshold_to_cosine(0.07) == pytest.approx(0.965)
    assert l2_threshold_to_cosine(0.35) == pytest.approx(0.825)
    assert l2_threshold_to_cosine(0.0) == pytest.approx(1.0)


def test_embeddings_are_unit_vectors_of_the_model_dim(
    embedder: SentenceTransformerEmbedder,
) -> None:
    v = embedder.embed([CAKE, REVOLUTION])
    assert v.shape == (2, embedder.dim) == (2, 384)
    assert v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    assert embedder.embed([]).shape == (0, 384)


async def test_paraphrase_rejected_unrelated_pass(deduper: Deduper) -> None:
    assert await deduper.screen("job", ["c1"], [CAKE], THRESHOLD) == [True]
    flags = await deduper.screen(
        "job", ["c2", "r", "l"], [CAKE_PARAPHRASE, REVOLUTION, LINKED_LIST], THRESHOLD
    )
    assert flags == [False, True, True]


async def test_within_batch_duplicates_are_caught(deduper: Deduper) -> None:
    flags = await deduper.screen(
        "job",
        ["a", "b", "c", "d"],
        [CAKE, REVOLUTION, CAKE_PARAPHRASE, CAKE],
        THRESHOLD,
    )
    assert flags == [True, True, False, False]
    # Only the accepted ones went into the index.
    assert await deduper.vectors.count("job") == 2


async def test_accepted_items_are_seen_by_the_next_batch(deduper: Deduper) -> None:
    assert await deduper.screen("job", ["r"], [REVOLUTION], THRESHOLD) == [True]
    assert await deduper.vectors.count("job") == 1
    assert await deduper.screen("job", ["r2"], [REVOLUTION], THRESHOLD) == [False]
    assert await deduper.screen("job", ["x"], [CAPITAL], THRESHOLD) == [True]
    assert await deduper.vectors.count("job") == 2


async def test_jobs_do_not_see_each_other(deduper: Deduper) -> None:
    assert await deduper.screen("job-a", ["1"], [CAKE], THRESHOLD) == [True]
    assert await deduper.screen("job-b", ["1"], [CAKE], THRESHOLD) == [True]


async def test_threshold_decides(deduper: Deduper) -> None:
    await deduper.screen("job", ["c"], [CAKE], THRESHOLD)
    # At a near-exact-match threshold the paraphrase is new.
    assert await deduper.screen("job", ["p"], [CAKE_PARAPHRASE], 0.99) == [True]


async def test_empty_batch(deduper: Deduper) -> None:
    assert await deduper.screen("job", [], [], THRESHOLD) == []


async def test_restore_indexes_existing_rows(deduper: Deduper) -> None:
    await deduper.restore("job", ["c", "l"], [CAKE, LINKED_LIST], chunk=1)
    assert await deduper.vectors.count("job") == 2
    flags = await deduper.screen("job", ["p", "x"], [CAKE_PARAPHRASE, CAPITAL], THRESHOLD)
    assert flags == [False, True]


async def test_redelivered_batch_keeps_its_verdict(deduper: Deduper) -> None:
    first = await deduper.screen("job", ["a", "b"], [CAKE, CAKE_PARAPHRASE], THRESHOLD)
    again = await deduper.screen("job", ["a", "b"], [CAKE, CAKE_PARAPHRASE], THRESHOLD)
    assert first == again == [True, False]
    assert await deduper.vectors.count("job") == 1


async def test_durable_vectors_are_shared_between_processes(
    embedder: SentenceTransformerEmbedder, tmp_path
) -> None:
    from airoboros.store import SqlStore

    store = SqlStore(f"sqlite+aiosqlite:///{tmp_path}/d.sqlite")
    await store.connect()
    try:
        await store.jobs.ensure("job", config={}, targets={})
        one = Deduper(embedder, FaissVectorStore(embedder.dim), durable=store.vectors)
        two = Deduper(embedder, FaissVectorStore(embedder.dim), durable=store.vectors)
        assert await one.screen("job", ["a"], [CAKE], THRESHOLD) == [True]
        # A second replica (or a restarted run) sees what the first accepted.
        assert await two.screen("job", ["b"], [CAKE_PARAPHRASE], THRESHOLD) == [False]
        assert await two.screen("job", ["c"], [LINKED_LIST], THRESHOLD) == [True]
        assert await one.screen("job", ["d"], [LINKED_LIST], THRESHOLD) == [False]
        assert await store.vectors.count("job") == 2
    finally:
        await store.close()


def _words(sentence: str, n: int) -> str:
    words = sentence.split()
    return " ".join(words[i % len(words)] for i in range(n))


def test_long_text_embeds_every_window(embedder: SentenceTransformerEmbedder) -> None:
    head = _words(
        "Bakers knead the bread dough with flour water yeast and salt before the oven bakes it.",
        200,
    )
    tail = _words(
        "Quarks and gluons interact through the strong force described by quantum chromodynamics.",
        250,
    )
    long_text = head + " " + tail
    n_tokens = len(embedder._tokenizer(long_text, add_special_tokens=False)["input_ids"])
    assert n_tokens > 256

    v_long, v_head, v_tail = embedder.embed([long_text, head, tail])
    assert np.linalg.norm(v_long) == pytest.approx(1.0, abs=1e-4)
    # A model that silently truncates would give (nearly) the head's embedding.
    assert float(v_long @ v_head) < 0.95
    assert float(v_long @ v_tail) > float(v_head @ v_tail) + 0.1


async def test_concurrent_screens_share_one_embedding_in_order(
    embedder: SentenceTransformerEmbedder,
) -> None:
    # Three messages within the batching window: one forward pass, and each is screened
    # against the ones before it as if they had come one after another.
    deduper = Deduper(embedder, FaissVectorStore(embedder.dim), batch_wait=0.5)
    flags = await asyncio.gather(
        deduper.screen("job", ["a"], [CAKE], THRESHOLD),
        deduper.screen("job", ["b"], [CAKE_PARAPHRASE], THRESHOLD),
        deduper.screen("other", ["c"], [CAKE_PARAPHRASE], THRESHOLD),
        deduper.screen("job", ["d", "e"], [CAPITAL, REVOLUTION], THRESHOLD),
    )
    assert flags == [[True], [False], [True], [True, True]]
    assert deduper.embed_calls == 1
    assert deduper.embedded_texts == 5


async def test_an_embedding_batch_holds_at_most_batch_texts(
    embedder: SentenceTransformerEmbedder,
) -> None:
    deduper = Deduper(embedder, FaissVectorStore(embedder.dim), batch_wait=0.5, batch_texts=2)
    flags = await asyncio.gather(
        *(deduper.screen("job", [t], [t], THRESHOLD) for t in (CAKE, CAPITAL, REVOLUTION))
    )
    assert flags == [[True], [True], [True]]
    assert deduper.embed_calls == 2


async def test_a_failed_embedding_fails_every_screen_waiting_on_it() -> None:
    class Broken:
        dim = 384

        def embed(self, texts: object) -> np.ndarray:
            raise RuntimeError("out of memory")

    deduper = Deduper(Broken(), FaissVectorStore(384), batch_wait=0.1)
    results = await asyncio.gather(
        deduper.screen("job", ["a"], [CAKE], THRESHOLD),
        deduper.screen("job", ["b"], [CAPITAL], THRESHOLD),
        return_exceptions=True,
    )
    assert all(isinstance(r, RuntimeError) for r in results)
    # The next screen gets an embedding of its own (and fails the same way, not hangs).
    with pytest.raises(RuntimeError):
        await asyncio.wait_for(deduper.screen("job", ["c"], [CAKE], THRESHOLD), 5)
