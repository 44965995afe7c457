"""Two dedupe replicas on one dataset must never both accept near-duplicates, even when
the candidates arrive at the same moment: the dedupe topic is partitioned by dataset and
each partition has a single active consumer (see Bus), so screening is serial per dataset."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from airoboros.bus_amqp import AmqpBus
from airoboros.contracts import Candidate, CandidatesProposed, CandidatesScreened
from airoboros.dedupe.worker import run_worker
from airoboros.settings import DedupeSettings
from airoboros.store import SqlStore
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


async def test_two_replicas_never_accept_near_duplicates_together():
    name, url = create_database()
    prefix = "t" + uuid.uuid4().hex[:10]
    settings = DedupeSettings(
        database_url=url, amqp_prefix=prefix, dedupe_partitions=2, port=0, host="127.0.0.1"
    )
    store = SqlStore(url)
    await store.connect()
    job_id = uuid.uuid4().hex
    await store.jobs.ensure(job_id, config={}, targets={"general": 100})
    stop = asyncio.Event()
    workers = [asyncio.create_task(run_worker(settings, stop)) for _ in range(2)]
    bus = AmqpBus(settings.amqp_url, prefix=prefix, partitions=settings.partitions())
    verdicts: list[CandidatesScreened] = []
    got = asyncio.Event()
    n_messages = 24

    async def collect(msg: CandidatesScreened) -> None:
        verdicts.append(msg)
        if len(verdicts) == n_messages:
            got.set()

    bus.subscribe(CandidatesScreened, collect, concurrency=8, group="generator")
    try:
        await asyncio.sleep(8)  # both replicas load the model and start consuming
        await bus.start()
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
        await asyncio.gather(*(bus.publish(m) for m in messages))
        await asyncio.wait_for(got.wait(), timeout=120)
        accepted = [c.instruction for v in verdicts for c in v.accepted]
        # Exactly one of each near-duplicate family was ever accepted.
        assert len(accepted) == 3, accepted
        families = {k for a in accepted for k in range(3) if a in (TEXTS[k], PARAPHRASES[k])}
        assert families == {0, 1, 2}
        assert await store.vectors.count(job_id) == 3
    finally:
        stop.set()
        await asyncio.gather(*workers, return_exceptions=True)
        await bus.close()
        await store.close()
        drop_database(name)
        await asyncio.to_thread(delete_amqp, prefix)
