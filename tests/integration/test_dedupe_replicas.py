"""Dedupe replicas on one dataset must never both accept near-duplicates, even when the
candidates arrive at the same moment.

Two ways to run several replicas, both tested on real RabbitMQ + PostgreSQL:
- partitioned (AIROBOROS_DEDUPE_PARTITIONS > 1): the topic is split by dataset and each
  partition has a single active consumer, so one dataset is screened by one replica;
- competing consumers (AIROBOROS_DEDUPE_PARTITIONS=1): every replica screens the same
  dataset at once; check-and-insert takes the dataset's PostgreSQL advisory lock
  (``VectorRepository.exclusive``), so the second of two racing batches sees the first's
  vectors. ``test_racing_dedupers_*`` shows that the lock is what makes this safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from collections.abc import AsyncIterator, Sequence

import aio_pika
import numpy as np
import pytest

from airoboros.bus_amqp import AmqpBus
from airoboros.contracts import Candidate, CandidatesProposed, CandidatesScreened
from airoboros.dedupe.service import Deduper
from airoboros.dedupe.worker import run_worker
from airoboros.settings import DedupeSettings
from airoboros.store import SqlStore
from airoboros.vectors import FaissVectorStore
from tests.integration.services_harness import create_database, delete_amqp, drop_database

pytestmark = pytest.mark.services

TEXTS = [
    "How do I bake a chocolate cake at home?",
    "What is the capital city of Australia?",
    "Explain how a linked list differs from an array.",
]
PARAPHRASES = [
    "How can I bake a chocolate cake at home?",
    "Which city is the capital of Australia?",
    "Explain the difference between a linked list and an array.",
]


async def _consumers(prefix: str, queue: str) -> int:
    conn = await aio_pika.connect("amqp://guest:guest@127.0.0.1:5672/", timeout=10)
    try:
        channel = await conn.channel()
        try:
            q = await channel.declare_queue(queue, passive=True)
        except aio_pika.exceptions.ChannelClosed:
            return 0
        return int(q.declaration_result.consumer_count or 0)
    finally:
        await conn.close()


async def _race_on_replicas(replicas: int, partitions: int, copies: int = 1) -> None:
    """``replicas`` dedupe workers; 24 messages (each ``copies`` times, as at-least-once
    delivery may) alternating three texts and their paraphrases, published at once."""
    name, url = create_database()
    prefix = "t" + uuid.uuid4().hex[:10]
    settings = DedupeSettings(
        database_url=url,
        amqp_prefix=prefix,
        dedupe_partitions=partitions,
        dedupe_concurrency=4,
        embedding_batch_wait_ms=5,
        port=0,
        host="127.0.0.1",
    )
    store = SqlStore(url)
    await store.connect()
    job_id = uuid.uuid4().hex
    await store.jobs.ensure(job_id, config={}, targets={"general": 100})
    stop = asyncio.Event()
    workers = [asyncio.create_task(run_worker(settings, stop)) for _ in range(replicas)]
    bus = AmqpBus(settings.amqp_url, prefix=prefix, partitions=settings.partitions())
    verdicts: list[CandidatesScreened] = []
    got = asyncio.Event()
    n_messages = 24

    async def collect(msg: CandidatesScreened) -> None:
        verdicts.append(msg)
        if len(verdicts) == n_messages * copies:
            got.set()

    bus.subscribe(CandidatesScreened, collect, concurrency=8, group="generator")
    try:
        await bus.start()
        await bus.ensure_queue(CandidatesProposed, group="dedupe")
        # Every replica consumes before anything is published, so they race for it.
        queues = bus.queue_names(CandidatesProposed, "dedupe")
        for _ in range(240):
            counts = [await _consumers(prefix, q) for q in queues]
            if (partitions > 1 and all(counts)) or (partitions == 1 and counts[0] == replicas):
                break
            await asyncio.sleep(0.5)
        else:
            raise AssertionError(f"the replicas did not all consume: {counts}")
        messages = []
        for i in range(n_messages):
            texts = TEXTS if i % 2 == 0 else PARAPHRASES
            messages.append(
                CandidatesProposed(
                    job_id=job_id,
                    task_id=f"t{i}",
                    instructor="general",
                    threshold=0.8,
                    candidates=[Candidate(instruction=t) for t in texts],
                )
            )
        # All at once: the replicas race for them.
        await asyncio.gather(*(bus.publish(m) for m in messages for _ in range(copies)))
        await asyncio.wait_for(got.wait(), timeout=180)
        # Nothing lost: one verdict per delivery, every candidate judged.
        assert len(verdicts) == n_messages * copies
        assert sum(len(v.accepted) + v.stats.duplicates for v in verdicts) == 3 * len(verdicts)
        by_task: dict[str, set[frozenset[str]]] = {}
        for v in verdicts:
            by_task.setdefault(v.task_id, set()).add(frozenset(c.candidate_id for c in v.accepted))
        # A message screened twice (a redelivery) gets the same verdict both times.
        assert all(len(s) == 1 for s in by_task.values()), by_task
        accepted = {c.candidate_id: c.instruction for v in verdicts for c in v.accepted}
        # Exactly one of each near-duplicate family was ever accepted.
        assert len(accepted) == 3, accepted
        families = {
            k for a in accepted.values() for k in range(3) if a in (TEXTS[k], PARAPHRASES[k])
        }
        assert families == {0, 1, 2}
        assert await store.vectors.count(job_id) == 3
    finally:
        stop.set()
        await asyncio.gather(*workers, return_exceptions=True)
        await bus.close()
        await store.close()
        drop_database(name)
        await asyncio.to_thread(delete_amqp, prefix, partitions)


async def test_two_partitioned_replicas_never_accept_near_duplicates_together():
    await _race_on_replicas(replicas=2, partitions=2)


@pytest.mark.parametrize("replicas", [2, 4])
async def test_competing_replicas_never_accept_near_duplicates_together(replicas: int):
    await _race_on_replicas(replicas=replicas, partitions=1)


async def test_competing_replicas_give_a_redelivered_message_its_verdict_again():
    await _race_on_replicas(replicas=2, partitions=1, copies=2)


# --- the lock is what makes competing replicas safe ---------------------------------------

DIM = 32


class FamilyEmbedder:
    """Instant embeddings: texts ``f<k>/<variant>`` of one family ``k`` are near-duplicates
    (cosine ~0.98), different families far apart. No model, so racing checks overlap."""

    dim = DIM

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        for i, t in enumerate(texts):
            family = t.partition("/")[0]
            seed = int.from_bytes(hashlib.sha256(family.encode()).digest()[:4], "big")
            base = np.random.default_rng(seed).standard_normal(DIM)
            noise_seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:4], "big")
            noise = np.random.default_rng(noise_seed).standard_normal(DIM) * 0.03
            v = base / np.linalg.norm(base) + noise
            out[i] = v / np.linalg.norm(v)
        return out


class Unlocked:
    """The durable vectors with the cross-process lock taken away."""

    def __init__(self, durable: object) -> None:
        self._durable = durable

    def __getattr__(self, name: str) -> object:
        return getattr(self._durable, name)

    @contextlib.asynccontextmanager
    async def exclusive(self, namespace: str) -> AsyncIterator[None]:
        yield


async def _race_dedupers(replicas: int, *, locked: bool) -> tuple[int, int, list[int]]:
    """``replicas`` Dedupers, each with its own connection pool and in-memory index (as
    separate processes have), sharing one PostgreSQL database; 20 rounds in which each
    replica screens a different near-duplicate of the same family at the same moment.
    Returns (accepted, families, vectors stored)."""
    name, url = create_database()
    stores = [SqlStore(url) for _ in range(replicas)]
    try:
        for i, s in enumerate(stores):
            await s.connect(migrate=i == 0)
        dedupers = [
            Deduper(
                FamilyEmbedder(),
                FaissVectorStore(DIM),
                durable=s.vectors if locked else Unlocked(s.vectors),  # type: ignore[arg-type]
            )
            for s in stores
        ]
        rounds = 20
        accepted = 0
        for k in range(rounds):
            flags = await asyncio.gather(
                *(
                    d.screen("job", [f"r{r}-c{k}"], [f"f{k}/v{r}"], 0.9)
                    for r, d in enumerate(dedupers)
                )
            )
            accepted += sum(f[0] for f in flags)
        stored = await stores[0].vectors.count("job")
        return accepted, rounds, [stored]
    finally:
        for s in stores:
            await s.close()
        drop_database(name)


@pytest.mark.parametrize("replicas", [2, 4])
async def test_racing_dedupers_accept_one_of_each_family_under_the_lock(replicas: int):
    accepted, families, (stored,) = await _race_dedupers(replicas, locked=True)
    assert accepted == families
    assert stored == families


async def test_racing_dedupers_without_the_lock_accept_near_duplicates():
    # The control: the same race, the lock taken away, lets near-duplicates through.
    # (So the test above would fail without the lock.)
    accepted, families, (stored,) = await _race_dedupers(4, locked=False)
    assert accepted > families
    assert stored > families


async def test_a_redelivery_to_another_replica_keeps_its_verdict():
    name, url = create_database()
    one, two = SqlStore(url), SqlStore(url)
    try:
        await one.connect()
        await two.connect(migrate=False)
        a = Deduper(FamilyEmbedder(), FaissVectorStore(DIM), durable=one.vectors)
        b = Deduper(FamilyEmbedder(), FaissVectorStore(DIM), durable=two.vectors)
        # Replica a accepts c1 and c3 (c2 is c1's near-duplicate), then dies before its
        # verdict goes out; the broker redelivers the batch to replica b.
        batch = (["c1", "c2", "c3"], ["f1/a", "f1/b", "f2/a"])
        assert await a.screen("job", *batch, 0.9) == [True, False, True]
        assert await b.screen("job", *batch, 0.9) == [True, False, True]
        assert await one.vectors.count("job") == 2
        # A new near-duplicate on either replica is still refused.
        assert await b.screen("job", ["c4"], ["f2/b"], 0.9) == [False]
        assert await a.screen("job", ["c5"], ["f1/c"], 0.9) == [False]
    finally:
        await one.close()
        await two.close()
        drop_database(name)
