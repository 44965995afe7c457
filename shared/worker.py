"""What the queue workers share: connecting, running until SIGTERM, closing in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from airoboros.config import Config
from airoboros.errors import ConfigError, NotFoundError, StoreUnavailable, is_unavailable
from airoboros.health import HealthServer
from airoboros.jobboard import JobBoard
from airoboros.ports import Bus, ObjectStore
from airoboros.settings import ServiceSettings
from airoboros.store import JobRepository, Store

log = logging.getLogger(__name__)


def make_bus(settings: ServiceSettings) -> Bus:
    """The deployment's bus (RabbitMQ) from the AIROBOROS_AMQP_* and partition settings."""
    from airoboros.bus_amqp import AmqpBus

    return AmqpBus(
        settings.amqp_url,
        prefix=settings.amqp_prefix,
        max_deliveries=settings.max_deliveries,
        partitions=settings.partitions(),
    )


def make_objects(settings: ServiceSettings) -> ObjectStore:
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


def job_config(
    settings: ServiceSettings, raw: dict[str, Any], *, api_key: str | None = None
) -> Config:
    """A stored job config with its endpoint and key as the server's policy decides
    (airoboros.policy): the job's own key (``api_key``, kept apart from the config), and
    the server's key only when the calls go to the server's own endpoint. No key or URL
    is taken from the config's keys or the environment. A config naming an endpoint the
    server may not call raises ConfigError (one stored before the rule existed)."""
    from airoboros.policy import ServerPolicy

    policy = ServerPolicy.from_settings(settings)
    # The same review as at POST (defence in depth, and for configs stored before it).
    kept, problems, _ = policy.review({k: v for k, v in raw.items() if k != "openai_api_key"})
    if problems:
        raise ConfigError(problems)
    return with_credentials(settings, Config.model_validate(kept), api_key)


def with_credentials(settings: ServiceSettings, cfg: Config, job_key: str | None) -> Config:
    """``cfg`` with its endpoint and key as ``ServerPolicy.credentials`` decides: the
    job's own key (``job_key``), or the server's only for the server's own endpoint; a
    config naming an endpoint the server may not call raises ConfigError."""
    from airoboros.policy import ServerPolicy

    try:
        base_url, key = ServerPolicy.from_settings(settings).credentials(
            cfg.base_url, job_key, settings.openai_api_key
        )
    except PermissionError:
        raise ConfigError(
            ["base_url: not an endpoint this server may call (AIROBOROS_ALLOWED_BASE_URLS)"]
        ) from None
    return cfg.with_credentials(base_url, key)


class JobStatusCache:
    """Whether a job is still running, re-read at most every ``ttl`` seconds: workers
    drop the work of cancelled and finished jobs instead of paying for it.

    ``source`` answers for one job: the store's jobs (``from_jobs``, for workers that have
    a store) or the job board (``from_board``, for the generator, which has none). Only answers
    are cached: a job that does not exist is not running, but a source that cannot be
    asked raises an outage (``DependencyUnavailable``), so that the bus keeps the message
    and tries again instead of dropping it as "not running".
    """

    def __init__(self, source: Callable[[str], Awaitable[bool]], ttl: float = 1.0) -> None:
        self.source = source
        self.ttl = ttl
        #: job -> when it was last seen running (only "running" is cached)
        self._running_at: dict[str, float] = {}

    @classmethod
    def from_jobs(cls, jobs: JobRepository, ttl: float = 1.0) -> JobStatusCache:
        async def running(job_id: str) -> bool:
            try:
                job = await jobs.get(job_id)
            except NotFoundError:
                return False
            except Exception as exc:
                if is_unavailable(exc):
                    raise StoreUnavailable(
                        f"cannot read the status of job {job_id}: {type(exc).__name__}: {exc}"
                    ) from exc
                raise
            return job.status == "running" and not job.cancel_requested

        return cls(running, ttl)

    @classmethod
    def from_board(cls, board: JobBoard, ttl: float = 1.0) -> JobStatusCache:
        async def running(job_id: str) -> bool:
            return await board.status(job_id) == "running"

        return cls(running, ttl)

    async def running(self, job_id: str) -> bool:
        """Only "running" is cached: a job that is not running is asked again at every
        message. A resumed job's first tasks are published after its status says running
        again, so a worker that reads the status when a task arrives never drops one of
        them on a stale "cancelled" (it did, and the resumed job stalled until its tasks
        timed out); dropping a cancelled job's queued messages costs one read each."""
        now = asyncio.get_running_loop().time()
        seen = self._running_at.get(job_id)
        if seen is not None and now - seen < self.ttl:
            return True
        ok = await self.source(job_id)
        if ok:
            self._running_at[job_id] = now
        else:
            self._running_at.pop(job_id, None)
        return ok


#: A readiness check: True when a dependency answers now.
Check = Callable[[], Awaitable[bool]]


async def dependencies_ready(store: Store | None, bus: Bus | None, *checks: Check) -> bool:
    """Whether a service's dependencies answer now, for its /readyz: the broker
    connection is up (``bus.connected``, state only), the SQL database answers a trivial
    query (``store.ping()``, at most 2 s), and each of ``checks`` returns True. Pass None
    for what the service does not use. Never raises: a failing check means not ready."""
    try:
        if bus is not None and not bus.connected:
            return False
        if store is not None and not await store.ping():
            return False
        for check in checks:
            if not await check():
                return False
    except Exception as exc:
        log.debug("readiness check failed: %r", exc)
        return False
    return True


async def serve(
    settings: ServiceSettings,
    bus: Bus,
    stop: asyncio.Event,
    banner: str,
    *,
    store: Store | None = None,
    checks: Sequence[Check] = (),
) -> None:
    """Serve the health probes, start the bus, and run until ``stop``; the bus and the
    probes are closed on the way out (the caller closes its own resources after).

    /readyz answers 200 once the bus has started and, at each probe, while its
    dependencies answer (``dependencies_ready``: the broker, ``store`` when the worker
    uses one, and ``checks``), else 503."""
    ready = False

    async def is_ready() -> bool:
        return ready and await dependencies_ready(store, bus, *checks)

    health = HealthServer(settings.host, settings.port, is_ready)
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
