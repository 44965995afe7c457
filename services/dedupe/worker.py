"""The dedupe worker: ``python -m airoboros.dedupe``.

Consumes CandidatesProposed. With AIROBOROS_DEDUPE_PARTITIONS=1 every replica competes for
one queue, so one job's dedupe is spread over all of them: each replica embeds what it
took (together, across messages and jobs, see ``Deduper``), then checks and inserts under
the dataset's PostgreSQL advisory lock, after loading what the other replicas accepted:
two near-duplicates can never both be accepted. With more partitions the topic is split
by job, each partition with a single active consumer (one replica screens a job at a
time; the lock is taken too). Accepted vectors are written to the SQL store before the
verdict goes out. A job's faiss index turns approximate past
AIROBOROS_DEDUPE_APPROX_ABOVE vectors; with AIROBOROS_DEDUPE_SNAPSHOT_URL it is saved to
that object store and restored on restart. With AIROBOROS_WEAVIATE_URL, Weaviate holds the
vectors instead.
"""

from __future__ import annotations

import asyncio
import logging

from airoboros.contracts import CandidatesProposed
from airoboros.dedupe.service import Deduper, DedupeService
from airoboros.ports import VectorStore
from airoboros.settings import DedupeSettings
from airoboros.store import VectorRepository, make_store
from airoboros.worker import JobStatusCache, make_bus, serve, stop_event

log = logging.getLogger(__name__)
GROUP = "dedupe"


async def run_worker(settings: DedupeSettings, stop: asyncio.Event | None = None) -> None:
    from airoboros.embeddings import SentenceTransformerEmbedder
    from airoboros.vectors import FaissVectorStore, IndexSnapshots

    stop = stop or stop_event()
    store = make_store(settings.database_url)
    await store.connect(migrate=False)
    embedder = await asyncio.to_thread(
        SentenceTransformerEmbedder,
        settings.embedding_model,
        settings.embedding_device,
        dtype=settings.embedding_dtype,
    )
    if settings.embedding_threads > 0:
        import torch

        torch.set_num_threads(settings.embedding_threads)
    vectors: VectorStore
    durable: VectorRepository | None = store.vectors
    if settings.weaviate_url:
        from airoboros.vectors_weaviate import WeaviateVectorStore

        vectors = WeaviateVectorStore(settings.weaviate_url)
        durable = None  # Weaviate is itself shared by every replica
    else:
        vectors = FaissVectorStore(embedder.dim, approx_above=settings.dedupe_approx_above)
    snapshots = None
    if settings.dedupe_snapshot_url and durable is not None:
        from airoboros.objects_s3 import make_object_store

        url = settings.dedupe_snapshot_url
        s3 = url.startswith("s3://")  # the bucket's server and keys: the AIROBOROS_S3_* ones
        objects = make_object_store(
            url,
            endpoint=settings.s3_endpoint if s3 else None,
            access_key=settings.s3_access_key if s3 else None,
            secret_key=settings.s3_secret_key if s3 else None,
            secure=settings.s3_secure and s3,
        )
        snapshots = IndexSnapshots(objects, every=settings.dedupe_snapshot_every)
    bus = make_bus(settings)
    deduper = Deduper(
        embedder,
        vectors,
        durable=durable,
        snapshots=snapshots,
        # Replicas take turns per dataset through the database's lock, Weaviate or not.
        exclusive=store.vectors.exclusive,
        batch_wait=settings.embedding_batch_wait_ms / 1000.0,
        batch_texts=settings.embedding_batch_texts,
    )
    service = DedupeService(deduper, bus.publish)
    status = JobStatusCache.from_jobs(store.jobs)

    async def on_proposed(msg: CandidatesProposed) -> None:
        if await status.running(msg.job_id):
            await service.on_proposed(msg)

    partitioned = settings.dedupe_partitions > 1
    if not partitioned and store.dialect != "postgresql":
        log.warning(
            "the dedupe topic is not partitioned and the store is %s: replicas of this "
            "service do not exclude each other (run one, or use PostgreSQL)",
            store.dialect,
        )
    # Partitioned: at most one message per partition at once (the bus enforces it).
    # Competing consumers: several at once, embedded together, checked in turn.
    concurrency = settings.dedupe_partitions if partitioned else settings.dedupe_concurrency
    bus.subscribe(CandidatesProposed, on_proposed, concurrency=concurrency, group=GROUP)
    mode = (
        f"{settings.dedupe_partitions} partitions"
        if partitioned
        else f"competing consumers, {concurrency} at once"
    )
    try:
        await serve(
            settings,
            bus,
            stop,
            f"dedupe ready ({mode})",
            store=store,
        )
    finally:
        await store.close()
