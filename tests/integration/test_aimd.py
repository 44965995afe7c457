"""Adaptive concurrency against a server with a hidden capacity of K calls at once (429
beyond K, no rate-limit headers), through the real LLMClient over HTTP; and one window
shared by two replicas through the local Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from redis.asyncio import Redis

from airoboros.llm import LLMClient, LLMSettings, RateLimiter, UsageMeter
from airoboros.llm.shared_limits import RedisRateLimiter
from tests.fakes.capacity_server import CapacityServer

MSG = [{"role": "user", "content": "Say something about lighthouses."}]


def make_client(srv: CapacityServer, limiter: RateLimiter) -> LLMClient:
    settings = LLMSettings(base_url=srv.base_url, api_key="k", backoff_base=0.2)
    return LLMClient(settings, limiter, UsageMeter())


async def drive(clients: list[LLMClient], seconds: float, pending: int) -> tuple[int, int]:
    """Keep ``pending`` calls waiting on each client for ``seconds``; (ok, failed)."""
    stop = time.monotonic() + seconds
    ok = failed = 0

    async def worker(c: LLMClient) -> None:
        nonlocal ok, failed
        while time.monotonic() < stop:
            try:
                await c.complete(MSG, model="test-model", instructor="general")
                ok += 1
            except Exception:
                failed += 1

    await asyncio.gather(*(worker(c) for c in clients for _ in range(pending)))
    return ok, failed


def steady_rate(srv: CapacityServer, start: float, end: float) -> float:
    done = [t for t in srv.llm.done_at if start <= t <= end]
    return len(done) / (end - start)


async def oracle_rate(k: int, latency: float, seconds: float = 4.0) -> float:
    """The steady rate of a client told K (no window, K calls at once) against the same
    server, measured in the same test: the baseline a loaded machine slows alike."""
    with CapacityServer(capacity=k, latency=latency) as srv:
        client = make_client(srv, RateLimiter(max_concurrency=k, adaptive_concurrency=False))
        t0 = time.monotonic()
        try:
            ok, failed = await drive([client], seconds, k)
        finally:
            await client.close()
        t1 = time.monotonic()
    assert failed == 0 and ok > 0
    return steady_rate(srv, t0 + 1.0, t1)


@pytest.mark.parametrize(("k", "latency"), [(4, 0.1), (16, 0.2)])
async def test_converges_to_the_hidden_capacity(k: int, latency: float) -> None:
    baseline = await oracle_rate(k, latency)
    with CapacityServer(capacity=k, latency=latency) as srv:
        limiter = RateLimiter(max_concurrency=64)  # no limits configured: adaptive
        assert limiter.adaptive
        client = make_client(srv, limiter)
        t0 = time.monotonic()
        try:
            ok, failed = await drive([client], 7.0, 64)
        finally:
            await client.close()
        t1 = time.monotonic()
        st = srv.llm.stats()
    assert failed == 0  # every call eventually succeeded
    assert ok == st["admitted"]
    rate = steady_rate(srv, t0 + 2.0, t1)
    # As fast as a client told K, within 20% (both measured on this machine, now).
    assert rate >= 0.8 * baseline, (rate, baseline, st)
    share = st["rejected"] / st["requests"]
    assert share <= 0.05, st
    window = limiter.concurrency_window()
    assert window is not None and k - 2 <= window <= k + 1, window


async def test_a_429_without_headers_pauses_no_one_under_the_window() -> None:
    with CapacityServer(capacity=1, latency=0.3) as srv:
        limiter = RateLimiter(max_concurrency=8, initial_window=2)
        client = make_client(srv, limiter)
        try:
            outs = await asyncio.gather(
                *(client.complete(MSG, model="test-model", instructor="general") for _ in range(2))
            )
        finally:
            await client.close()
        assert srv.llm.rejected >= 1
    assert sum(o.rate_limited for o in outs) >= 1
    assert all(o.text for o in outs)
    assert limiter.concurrency_window() == 1  # the window was cut ...
    assert limiter._pause_until == 0.0  # ... and no one was paused

    # Without the window a 429 with no Retry-After pauses every caller (as before).
    with CapacityServer(capacity=1, latency=0.3) as srv:
        fixed = RateLimiter(max_concurrency=8, adaptive_concurrency=False)
        client = make_client(srv, fixed)
        try:
            await asyncio.gather(
                *(client.complete(MSG, model="test-model", instructor="general") for _ in range(2))
            )
        finally:
            await client.close()
    assert fixed._pause_until > 0.0


@pytest.fixture
async def redis() -> Any:
    client = Redis.from_url("redis://127.0.0.1:6379/0")
    prefix = "t" + uuid.uuid4().hex[:8]
    yield client, prefix
    keys = [k async for k in client.scan_iter(f"{prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def test_two_replicas_share_one_window_through_redis(redis: Any) -> None:
    r, prefix = redis
    k, latency = 8, 0.1
    scope = f"{prefix}:limit"
    baseline = await oracle_rate(k, latency)
    with CapacityServer(capacity=k, latency=latency) as srv:
        limiters = [RedisRateLimiter(r, scope, max_concurrency=32) for _ in range(2)]
        clients = [make_client(srv, lim) for lim in limiters]
        t0 = time.monotonic()
        try:
            ok, failed = await drive(clients, 7.0, 32)
        finally:
            for c in clients:
                await c.close()
        t1 = time.monotonic()
        st = srv.llm.stats()
        await asyncio.sleep(0.2)  # the last places are given back in the background
    assert failed == 0 and ok == st["admitted"]
    # Together the two replicas keep to the one capacity: few refusals, full use.
    assert st["rejected"] / st["requests"] <= 0.05, st
    assert steady_rate(srv, t0 + 2.0, t1) >= 0.8 * baseline
    state = {key.decode(): float(v) for key, v in (await r.hgetall(f"{scope}:aimd")).items()}
    assert k - 2 <= state["cwnd"] < k + 2, state  # one window for both, near K (not 2K)
    assert state["seq"] == st["requests"]  # every request of both took a place in it
    assert await r.zcard(f"{scope}:aimd:slots") == 0  # and gave it back
    for lim in limiters:  # each shows the shared window (as of its last call)
        shown = lim.concurrency_window()
        assert shown is not None and k - 2 <= shown <= k + 1


async def test_the_shared_window_waits_out_a_redis_blip(redis: Any, monkeypatch: Any) -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    from airoboros.llm import shared_limits

    r, prefix = redis
    monkeypatch.setattr(shared_limits, "REDIS_BACKOFF", (0.01, 0.05))
    limiter = RedisRateLimiter(r, f"{prefix}:limit", max_concurrency=8)
    fails = {"take": 2, "give": 2}

    def flaky(name: str, real: Any) -> Any:
        async def call(**kw: Any) -> Any:
            if fails[name] > 0:
                fails[name] -= 1
                raise RedisConnectionError("Error 111 connecting to 127.0.0.1:6379.")
            return await real(**kw)

        return call

    limiter._window_take = flaky("take", limiter._window_take)
    limiter._window_give = flaky("give", limiter._window_give)
    # Taking a place waits for Redis (no error, no skipped limit) ...
    async with limiter.slot(1) as ticket:
        assert ticket.seq == 1 and fails["take"] == 0
        ticket.outcome = "ok"
    # ... and giving it back is retried in the background until Redis answers.
    slots = f"{prefix}:limit:aimd:slots"
    for _ in range(100):
        if fails["give"] == 0 and await r.zcard(slots) == 0:
            break
        await asyncio.sleep(0.02)
    assert fails["give"] == 0
    assert await r.zcard(slots) == 0
    async with asyncio.timeout(2):  # the place is free again
        async with limiter.slot(1) as ticket:
            ticket.outcome = "ok"
    assert ticket.seq == 2


async def test_the_redis_window_follows_the_same_rules_as_the_local_one(redis: Any) -> None:
    import random

    from airoboros.llm.limiter import AIMDWindow, Ticket

    r, prefix = redis
    shared = RedisRateLimiter(r, f"{prefix}:limit", max_concurrency=40)
    local = AIMDWindow(40)
    rng = random.Random(15)
    held: list[tuple[Ticket, Ticket]] = []  # (shared's, local's) for the same call
    outcomes: list[Any] = ["ok"] * 6 + ["congested", "other"]
    compared = 0
    for _ in range(1500):
        if local.has_room() and (not held or rng.random() < 0.55):
            mine = local.acquire()
            theirs = await shared._window_acquire()
            assert theirs is not None
            assert (theirs.seq, theirs.level) == (mine.seq, mine.level)
            held.append((theirs, mine))
        else:
            theirs, mine = held.pop(rng.randrange(len(held)))
            theirs.outcome = mine.outcome = rng.choice(outcomes)
            local.release(mine)
            shared._window_release(theirs)
            await asyncio.gather(*shared._pending)
            cwnd = float(await r.hget(f"{prefix}:limit:aimd", "cwnd"))
            assert cwnd == pytest.approx(local.cwnd, rel=1e-9), (compared, local.state)
            compared += 1
    assert compared > 500
    assert local.state.ceiling > 0  # the run met decreases, probes and regrowth
