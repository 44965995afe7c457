"""Limits and budgets shared by generator replicas through the local Redis."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from redis.asyncio import Redis

from airoboros.config import Price
from airoboros.errors import BudgetExhausted
from airoboros.llm.shared_limits import RedisRateLimiter, RedisUsageMeter


@pytest.fixture
async def redis():
    client = Redis.from_url("redis://127.0.0.1:6379/0")
    prefix = "t" + uuid.uuid4().hex[:8]
    yield client, prefix
    keys = [k async for k in client.scan_iter(f"{prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def test_requests_per_minute_hold_across_replicas(redis):
    client, prefix = redis
    # Two "replicas", each free to run 16 calls at once, one shared limit of 600/min.
    replicas = [
        RedisRateLimiter(client, f"{prefix}:limit", max_concurrency=16, requests_per_minute=600)
        for _ in range(2)
    ]
    stamps: list[float] = []

    async def call(limiter: RedisRateLimiter) -> None:
        async with limiter.slot(10):
            stamps.append(time.monotonic())

    t0 = time.monotonic()
    await asyncio.gather(*(call(replicas[i % 2]) for i in range(21)))
    # 21 requests at 10/s in total: the last cannot leave before ~2 s.
    assert time.monotonic() - t0 >= 1.8
    stamps.sort()
    window = [s for s in stamps if s - stamps[0] <= 1.0]
    assert len(window) <= 12  # one second holds ~10, never the 32 both could send


async def test_a_429_pauses_every_replica(redis):
    client, prefix = redis
    a = RedisRateLimiter(client, f"{prefix}:limit", max_concurrency=4)
    b = RedisRateLimiter(client, f"{prefix}:limit", max_concurrency=4)
    a.pause(0.6)
    await asyncio.sleep(0.05)  # the pause is written in the background
    t0 = time.monotonic()
    async with b.slot(1):
        pass
    assert time.monotonic() - t0 >= 0.4


async def test_budget_is_shared(redis):
    client, prefix = redis
    key = f"{prefix}:usage:job"
    price = {"m": Price(prompt=1000.0, completion=1000.0)}
    one = RedisUsageMeter(client, key, max_cost=1.0, prices=price)
    two = RedisUsageMeter(client, key, max_cost=1.0, prices=price)
    await one.seed(0, 0.0)
    await one.arecord("general", "m", 400, 200)  # $0.60
    await two.acheck()  # still under
    await two.arecord("general", "m", 300, 200)  # $1.10 in all
    with pytest.raises(BudgetExhausted):
        await one.acheck()
    with pytest.raises(BudgetExhausted):
        await two.acheck()
