"""The generator worker: ``python -m airoboros.generator``.

Consumes GenerateBatch (step 1) and RespondToCandidates (step 2) from RabbitMQ, for any
number of jobs; each job's config comes from the SQL store. Rate limits and budgets are
shared with every other replica through Redis.
"""

from __future__ import annotations

import asyncio
import logging

from airoboros.contracts import GenerateBatch, RespondToCandidates
from airoboros.generator.service import GeneratorService, JobRuntime
from airoboros.llm.shared_limits import RedisRateLimiter, RedisUsageMeter, limiter_scope
from airoboros.pipeline import make_llm, prices_for
from airoboros.settings import GeneratorSettings
from airoboros.store import SqlStore
from airoboros.worker import JobStatusCache, job_config, make_bus, serve, stop_event

log = logging.getLogger(__name__)
GROUP = "generator"


async def run_worker(settings: GeneratorSettings, stop: asyncio.Event | None = None) -> None:
    from redis.asyncio import Redis

    stop = stop or stop_event()
    store = SqlStore(settings.database_url)
    await store.connect(migrate=False)
    redis = Redis.from_url(settings.redis_url)
    bus = make_bus(settings)
    runtimes: dict[str, JobRuntime] = {}
    lock = asyncio.Lock()
    status = JobStatusCache(store)

    async def runtime_for(job_id: str) -> JobRuntime:
        async with lock:
            if job_id not in runtimes:
                job = await store.get_job(job_id)
                cfg = job_config(settings, job.config, api_key=await store.llm_api_key(job_id))
                limiter = RedisRateLimiter(
                    redis,
                    limiter_scope(
                        settings.redis_prefix, cfg.resolved_base_url(), cfg.resolved_api_key()
                    ),
                    max_concurrency=min(cfg.max_concurrency, settings.max_concurrency),
                    requests_per_minute=cfg.requests_per_minute,
                    tokens_per_minute=cfg.tokens_per_minute,
                )
                meter = RedisUsageMeter(
                    redis,
                    f"{settings.redis_prefix}:usage:{job_id}",
                    max_tokens=cfg.max_tokens,
                    max_cost=cfg.max_cost,
                    prices=prices_for(cfg),
                )
                # A reservation outlives a replica that died mid-call by one call at most.
                meter.reservation_ttl = cfg.request_timeout + 60.0
                stats = await store.stats(job_id)
                await meter.seed(
                    sum(s.prompt_tokens + s.completion_tokens for s in stats.values()),
                    sum(s.cost for s in stats.values()),
                )
                runtimes[job_id] = JobRuntime(cfg, make_llm(cfg, limiter=limiter, meter=meter))
            return runtimes[job_id]

    service = GeneratorService(runtime_for, bus.publish)

    async def on_generate(msg: GenerateBatch) -> None:
        if await status.running(msg.job_id):
            await service.on_generate(msg)

    async def on_respond(msg: RespondToCandidates) -> None:
        if await status.running(msg.job_id):
            await service.on_respond(msg)

    bus.subscribe(GenerateBatch, on_generate, concurrency=settings.max_concurrency, group=GROUP)
    bus.subscribe(
        RespondToCandidates, on_respond, concurrency=settings.max_concurrency, group=GROUP
    )

    async def redis_up() -> bool:
        return bool(await redis.ping())

    try:
        await serve(
            settings,
            bus,
            stop,
            f"generator ready (max {settings.max_concurrency} calls in flight)",
            store=store,
            checks=[redis_up],
        )
    finally:
        for rt in runtimes.values():
            await rt.llm.close()
        await redis.aclose()
        await store.close()
