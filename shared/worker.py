"""What the queue workers share: connecting, running until SIGTERM, closing in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

from airoboros.config import Config
from airoboros.health import HealthServer
from airoboros.settings import ServiceSettings
from airoboros.store import SqlStore

log = logging.getLogger(__name__)


def make_bus(settings: ServiceSettings) -> Any:
    from airoboros.bus_amqp import AmqpBus

    return AmqpBus(
        settings.amqp_url,
        prefix=settings.amqp_prefix,
        max_deliveries=settings.max_deliveries,
        partitions=settings.partitions(),
    )


def make_objects(settings: ServiceSettings) -> Any:
    """The deployment's object store (S3/MinIO) from the AIROBOROS_S3_* settings."""
    from airoboros.objects_s3 import S3ObjectStore

    return S3ObjectStore(
        settings.s3_endpoint,
        settings.s3_access_key,
        settings.s3_secret_key,
        settings.s3_bucket,
        secure=settings.s3_secure,
    )


def stop_event() -> asyncio.Event:
    """Set on SIGTERM or SIGINT, so the worker can finish handlers and close cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Not possible outside the main thread (tests run workers in threads).
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    return stop


def job_config(settings: ServiceSettings, raw: dict[str, Any]) -> Config:
    """A stored job config, with the service's LLM credentials filled in where the job
    gives none (keys are never stored with jobs)."""
    cfg = Config.model_validate(raw)
    update: dict[str, Any] = {}
    if not cfg.openai_api_key and settings.openai_api_key:
        update["openai_api_key"] = settings.openai_api_key
    if not cfg.base_url and settings.openai_base_url:
        update["base_url"] = settings.openai_base_url
    return cfg.model_copy(update=update) if update else cfg


class JobStatusCache:
    """Whether a job is still running, re-read at most every ``ttl`` seconds: workers
    drop the work of cancelled and finished jobs instead of paying for it."""

    def __init__(self, store: SqlStore, ttl: float = 1.0) -> None:
        self.store = store
        self.ttl = ttl
        self._seen: dict[str, tuple[float, bool]] = {}

    async def running(self, job_id: str) -> bool:
        now = asyncio.get_running_loop().time()
        hit = self._seen.get(job_id)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        try:
            job = await self.store.get_job(job_id)
            ok = job.status == "running" and not job.cancel_requested
        except Exception:
            ok = False
        self._seen[job_id] = (now, ok)
        return ok


async def serve(settings: ServiceSettings, bus: Any, stop: asyncio.Event, banner: str) -> None:
    """Serve the health probes, start the bus, and run until ``stop``; the bus and the
    probes are closed on the way out (the caller closes its own resources after)."""
    ready = False
    health = HealthServer(settings.host, settings.port, lambda: ready)
    await health.start()
    try:
        await bus.start()
        ready = True
        log.info(banner)
        await stop.wait()
    finally:
        ready = False
        await bus.close()
        await health.close()
