"""The generator worker: ``python -m airoboros.generator``.

Consumes GenerateBatch (step 1) and RespondToCandidates (step 2) from RabbitMQ, for any
number of jobs. It needs no database: each command carries its job's settings
(``GenerateBatch.settings``), and the job board in Redis (airoboros.jobboard) says whether
the job still runs and holds the job's own API key when it has one. Rate limits and
budgets are shared with every other replica through Redis.
"""

from __future__ import annotations

import asyncio
import logging

from airoboros.config import Config, InstructorConfig
from airoboros.contracts import GenerateBatch, RespondToCandidates
from airoboros.errors import ConfigError
from airoboros.generator.service import Command, GeneratorService, JobRuntime
from airoboros.jobboard import RedisJobBoard
from airoboros.llm.factory import make_llm, prices_for
from airoboros.llm.shared_limits import RedisRateLimiter, RedisUsageMeter, limiter_scope
from airoboros.settings import GeneratorSettings
from airoboros.worker import JobStatusCache, make_bus, serve, stop_event, with_credentials

log = logging.getLogger(__name__)
GROUP = "generator"


def command_config(settings: GeneratorSettings, command: Command, job_key: str | None) -> Config:
    """The config a command carries, with its endpoint and key as the server's policy
    decides (airoboros.policy): the job's own key, or the server's key only when the calls
    go to the server's own endpoint."""
    if command.settings is None:
        raise ConfigError(
            [f"{command.kind} for job {command.job_id} carries no settings (an older topics?)"]
        )
    return with_credentials(settings, Config.model_validate(command.settings.config), job_key)


async def run_worker(settings: GeneratorSettings, stop: asyncio.Event | None = None) -> None:
    from redis.asyncio import Redis

    stop = stop or stop_event()
    redis = Redis.from_url(settings.redis_url)
    board = RedisJobBoard(redis, settings.redis_prefix)
    bus = make_bus(settings)
    runtimes: dict[str, JobRuntime] = {}
    lock = asyncio.Lock()
    status = JobStatusCache.from_board(board)

    async def runtime_for(command: Command) -> JobRuntime:
        async with lock:
            job_id = command.job_id
            if job_id not in runtimes:
                cfg = command_config(settings, command, await board.api_key(job_id))
                limiter = RedisRateLimiter(
                    redis,
                    limiter_scope(
                        settings.redis_prefix, cfg.resolved_base_url(), cfg.resolved_api_key()
                    ),
                    max_concurrency=min(cfg.max_concurrency, settings.max_concurrency),
                    requests_per_minute=cfg.requests_per_minute,
                    tokens_per_minute=cfg.tokens_per_minute,
                    adaptive_concurrency=cfg.adaptive_concurrency,
                )
                # A place in the shared window outlives a replica that died mid-call by
                # one call at most.
                limiter.slot_ttl = cfg.request_timeout + 60.0
                meter = RedisUsageMeter(
                    redis,
                    f"{settings.redis_prefix}:usage:{job_id}",
                    max_tokens=cfg.max_tokens,
                    max_cost=cfg.max_cost,
                    prices=prices_for(cfg),
                )
                # A reservation outlives a replica that died mid-call by one call at most.
                meter.reservation_ttl = cfg.request_timeout + 60.0
                assert command.settings is not None  # command_config checked it
                await meter.seed(command.settings.spent_tokens, command.settings.spent_cost)
                runtimes[job_id] = JobRuntime(cfg, make_llm(cfg, limiter=limiter, meter=meter))
            rt = runtimes[job_id]
            if command.instructor not in rt.config.instructors:
                # One runtime (one client, one limiter) per job: a command of another of
                # its instructors brings that instructor's block.
                assert command.settings is not None
                block = command.settings.config["instructors"][command.instructor]
                rt.config.instructors[command.instructor] = InstructorConfig.model_validate(block)
            return rt

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
            checks=[redis_up],
        )
    finally:
        for rt in runtimes.values():
            await rt.llm.close()
        await redis.aclose()
