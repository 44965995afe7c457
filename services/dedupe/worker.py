"""The dedupe worker: ``python -m airoboros.dedupe``.

Consumes CandidatesProposed from the partitioned dedupe topic: per partition one replica
at a time (single active consumer), so two near-duplicates of one dataset can never be
accepted side by side. Accepted vectors are written to the SQL store before the verdict
goes out, and each screen first loads what other replicas wrote, so a replica taking over
a partition sees the whole dataset. A job's faiss index turns approximate past
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
    deduper = Deduper(embedder, vectors, durable=durable, snapshots=snapshots)
    service = DedupeService(deduper, bus.publish)
    status = JobStatusCache.from_jobs(store.jobs)

    async def on_proposed(msg: CandidatesProposed) -> None:
        if await status.running(msg.job_id):
            await service.on_proposed(msg)

    bus.subscribe(
        CandidatesProposed, on_proposed, concurrency=settings.dedupe_partitions, group=GROUP
    )
    try:
        await serve(
            settings,
            bus,
            stop,
            f"dedupe ready ({settings.dedupe_partitions} partitions)",
            store=store,
        )
    finally:
        await store.close()
