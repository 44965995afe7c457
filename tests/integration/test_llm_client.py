"""LLMClient over real HTTP against the scripted server: retries, classification,
limits, accounting."""

from __future__ import annotations

import asyncio
import time

import pytest

from airoboros.config import Price
from airoboros.errors import (
    AuthError,
    BadRequestError,
    BudgetExhausted,
    ConnectError,
    LLMTimeoutError,
    ServerError,
)
from airoboros.llm import LLMClient, LLMSettings, RateLimiter, UsageMeter

MSG = [{"role": "user", "content": "Say something about lighthouses."}]


def client(base_url: str, **kw: object) -> LLMClient:
    limiter_kw = {k: kw.pop(k) for k in ("max_concurrency", "requests_per_minute") if k in kw}
    meter = kw.pop("meter", None) or UsageMeter()
    settings = LLMSettings(
        base_url=base_url,
        api_key="sk-test",
        backoff_base=0.05,
        backoff_cap=0.2,
        **kw,  # type: ignore[arg-type]
    )
    return LLMClient(settings, RateLimiter(**limiter_kw), meter)  # type: ignore[arg-type]


async def test_retries_server_errors_then_succeeds(llm_server):
    srv = llm_server(force=["500", "500", "ok"])
    c = client(srv.base_url)
    try:
        out = await c.complete(MSG, model="gpt-4", instructor="general")
    finally:
        await c.close()
    assert out.text and out.attempts == 3
    assert srv.llm.stats["requests"] == 3


async def test_gives_up_after_max_retries(llm_server):
    srv = llm_server(error_500_rate=1.0)
    c = client(srv.base_url, max_retries=2)
    try:
        with pytest.raises(ServerError, match="gave up after 3 attempts"):
            await c.complete(MSG, model="gpt-4", instructor="general")
    finally:
        await c.close()
    assert srv.llm.stats["requests"] == 3


async def test_bad_request_is_not_retried(llm_server):
    srv = llm_server(bad_request_marker="lighthouses")
    c = client(srv.base_url)
    try:
        with pytest.raises(BadRequestError):
            await c.complete(MSG, model="gpt-4", instructor="general")
    finally:
        await c.close()
    assert srv.llm.stats["requests"] == 1


async def test_auth_error_is_not_retried(llm_server):
    srv = llm_server(require_key="sk-other")
    c = client(srv.base_url)
    try:
        with pytest.raises(AuthError):
            await c.complete(MSG, model="gpt-4", instructor="general")
    finally:
        await c.close()
    assert srv.llm.stats["requests"] == 1


async def test_timeout_is_retried_within_bounds(llm_server):
    srv = llm_server(force=["timeout", "ok"], timeout_delay=3)
    c = client(srv.base_url, timeout=0.5)
    try:
        out = await c.complete(MSG, model="gpt-4", instructor="general")
    finally:
        await c.close()
    assert out.attempts == 2


async def test_retry_time_is_bounded(llm_server):
    srv = llm_server(timeout_rate=1.0, timeout_delay=5)
    c = client(srv.base_url, timeout=0.3, max_retries=100, max_retry_time=1.5)
    t0 = time.monotonic()
    try:
        with pytest.raises(LLMTimeoutError):
            await c.complete(MSG, model="gpt-4", instructor="general")
    finally:
        await c.close()
    assert time.monotonic() - t0 < 4


async def test_unreachable_endpoint():
    c = client("http://127.0.0.1:9/v1", max_retries=1)
    try:
        with pytest.raises(ConnectError):
            await c.preflight("gpt-4")
    finally:
        await c.close()


async def test_429_honours_retry_after_and_pauses_everyone(llm_server):
    srv = llm_server(force=["429"])  # Retry-After: 0.2 s
    c = client(srv.base_url, max_concurrency=4)
    try:
        t0 = time.monotonic()
        outs = await asyncio.gather(
            *(c.complete(MSG, model="gpt-4", instructor="x") for _ in range(4))
        )
    finally:
        await c.close()
    assert all(o.text for o in outs)
    assert sum(o.rate_limited for o in outs) == 1
    assert time.monotonic() - t0 >= 0.2


async def test_requests_per_minute_is_paced(llm_server):
    srv = llm_server()
    c = client(srv.base_url, requests_per_minute=600, max_concurrency=16)
    try:
        t0 = time.monotonic()
        await asyncio.gather(*(c.complete(MSG, model="gpt-4", instructor="x") for _ in range(11)))
        elapsed = time.monotonic() - t0
    finally:
        await c.close()
    # 11 requests at 10/s, evenly spaced: the last leaves ~1 s after the first.
    assert elapsed >= 0.9


async def test_usage_cost_and_budget(llm_server):
    srv = llm_server()
    meter = UsageMeter(max_cost=0.02, prices={"gpt-4": Price(prompt=30, completion=60)})
    c = client(srv.base_url, meter=meter, max_concurrency=1)
    calls = 0
    try:
        with pytest.raises(BudgetExhausted):
            for _ in range(100):
                await c.complete(MSG, model="gpt-4", instructor="general")
                calls += 1
    finally:
        await c.close()
    assert calls == srv.llm.stats["requests"]  # no request sent after the budget was hit
    assert meter.by_instructor["general"].cost == pytest.approx(meter.total.cost)
    assert meter.total.prompt_tokens == srv.llm.stats["prompt_tokens"]
    # The budget is a cap: what the server billed never passes it, and the calls stop only
    # when not even a capped answer (MIN_COMPLETION tokens) fits in what is left.
    billed = (srv.llm.stats["prompt_tokens"] * 30 + srv.llm.stats["completion_tokens"] * 60) / 1e6
    assert billed == pytest.approx(meter.total.cost)
    assert 0.02 - 128 * 60 / 1e6 - 0.002 < billed <= 0.02


async def test_truncated_output_reported(llm_server):
    srv = llm_server(force=["truncate"])
    c = client(srv.base_url)
    try:
        out = await c.complete(MSG, model="gpt-4", instructor="general")
    finally:
        await c.close()
    assert out.finish_reason == "length"
