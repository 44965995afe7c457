"""airoboros.llm.limiter: pacing, reset parsing, learnt limits and the concurrency cap."""

from __future__ import annotations

import asyncio
import time

import pytest

from airoboros.llm.limiter import RateLimiter, TokenBucket, parse_reset


async def test_token_bucket_paces_requests_evenly() -> None:
    bucket = TokenBucket(rate=100.0, capacity=1.0)
    start = time.monotonic()
    for _ in range(20):
        await bucket.take(1)
    elapsed = time.monotonic() - start
    # One free take, then 19 at 10 ms each: about 0.19 s. Loose bounds, no tight timing.
    assert 0.15 <= elapsed < 1.5


async def test_token_bucket_burst_up_to_capacity_is_immediate() -> None:
    bucket = TokenBucket(rate=1.0, capacity=50.0)
    start = time.monotonic()
    for _ in range(50):
        await bucket.take(1)
    assert time.monotonic() - start < 0.5


async def test_concurrent_takers_are_paced_too() -> None:
    bucket = TokenBucket(rate=100.0, capacity=1.0)
    start = time.monotonic()
    await asyncio.gather(*(bucket.take(1) for _ in range(20)))
    assert 0.15 <= time.monotonic() - start < 1.5


async def test_give_back_refunds_units() -> None:
    bucket = TokenBucket(rate=1.0, capacity=10.0)
    await bucket.take(10)
    bucket.give_back(10)
    start = time.monotonic()
    await bucket.take(10)  # would take ~10 s without the refund
    assert time.monotonic() - start < 0.5


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1h2m3.5s", 3723.5),
        ("2.5", 2.5),
        ("  7  ", 7.0),
        ("1m", 60.0),
    ],
)
def test_parse_reset(value: str, seconds: float) -> None:
    result = parse_reset(value)
    assert result == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "soon", "5x", "m"])
def test_parse_reset_rejects_garbage(value: str) -> None:
    assert parse_reset(value) is None


def test_learn_adopts_server_request_limit_when_none_configured() -> None:
    limiter = RateLimiter()
    assert limiter.rpm is None
    limiter.learn({"X-RateLimit-Limit-Requests": "600"})
    assert limiter.rpm == pytest.approx(600)
    limiter.learn({"x-ratelimit-limit-tokens": "90000"})
    assert limiter.tpm == pytest.approx(90000)


def test_learn_keeps_a_configured_limit_lower_than_the_servers() -> None:
    limiter = RateLimiter(requests_per_minute=100)
    limiter.learn({"x-ratelimit-limit-requests": "600"})
    assert limiter.rpm == pytest.approx(100)
    limiter.learn({"x-ratelimit-limit-requests": "50"})
    assert limiter.rpm == pytest.approx(50)


def test_learn_ignores_garbage_headers() -> None:
    limiter = RateLimiter()
    limiter.learn({"x-ratelimit-limit-requests": "lots", "x-ratelimit-remaining-tokens": "?"})
    assert limiter.rpm is None


async def test_learn_pauses_when_remaining_is_zero() -> None:
    limiter = RateLimiter()
    limiter.learn({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "300ms"})
    start = time.monotonic()
    async with limiter.slot(10):
        pass
    assert time.monotonic() - start >= 0.25


async def test_learn_does_not_pause_while_requests_remain() -> None:
    limiter = RateLimiter()
    limiter.learn({"x-ratelimit-remaining-requests": "5", "x-ratelimit-reset-requests": "30s"})
    start = time.monotonic()
    async with limiter.slot(10):
        pass
    assert time.monotonic() - start < 0.5


async def test_concurrency_cap_is_never_exceeded() -> None:
    limiter = RateLimiter(max_concurrency=2)
    inside = 0
    peak = 0
    done = 0

    async def call() -> None:
        nonlocal inside, peak, done
        async with limiter.slot(1):
            inside += 1
            peak = max(peak, inside)
            assert limiter.in_flight <= 2
            await asyncio.sleep(0.02)
            inside -= 1
        done += 1

    await asyncio.gather(*(call() for _ in range(8)))
    assert peak == 2
    assert done == 8
    assert limiter.in_flight == 0


async def test_slot_releases_on_error() -> None:
    limiter = RateLimiter(max_concurrency=1)
    with pytest.raises(RuntimeError):
        async with limiter.slot(1):
            raise RuntimeError("boom")
    assert limiter.in_flight == 0
    # The single slot is free again.
    async with asyncio.timeout(1):
        async with limiter.slot(1):
            pass


async def test_requests_per_minute_paces_slots() -> None:
    limiter = RateLimiter(requests_per_minute=6000)  # one every 10 ms
    start = time.monotonic()
    for _ in range(11):
        async with limiter.slot(1):
            pass
    assert 0.08 <= time.monotonic() - start < 1.5
