"""The adaptive concurrency window (AIMD): its arithmetic, its gate, and when it is on."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from airoboros.config import Config
from airoboros.llm import limiter as lim
from airoboros.llm.factory import make_llm
from airoboros.llm.limiter import AIMDWindow, RateLimiter, Ticket


class Pipe:
    """Calls kept in flight up to the window, answered oldest first (a steady load)."""

    def __init__(self, w: AIMDWindow) -> None:
        self.w = w
        self.flight: list[Ticket] = []
        self.fill()

    def fill(self) -> None:
        while self.w.has_room():
            self.flight.append(self.w.acquire())

    def answer(self, outcome: lim.Outcome = "ok", refill: bool = True) -> Ticket:
        t = self.flight.pop(0)
        t.outcome = outcome
        self.w.release(t)
        if refill:
            self.fill()
        return t

    def round_trip(self, outcome: lim.Outcome = "ok") -> None:
        """Answer every call in flight now."""
        for _ in range(len(self.flight)):
            self.answer(outcome)


def test_starts_small_and_slow_start_doubles_each_round_trip() -> None:
    w = AIMDWindow(64)
    p = Pipe(w)
    assert w.limit == lim.AIMD_INITIAL == 4
    seen = [w.limit]
    for _ in range(4):
        p.round_trip()
        seen.append(w.limit)
    assert seen == [4, 8, 16, 32, 64]
    p.round_trip()
    assert w.limit == 64  # never above max_concurrency
    assert AIMDWindow(2).limit == 2  # nor starts above it


def steady(max_window: int, cwnd: int, ceiling: int = 0) -> tuple[AIMDWindow, Pipe]:
    """A window past slow start at ``cwnd``, full."""
    w = AIMDWindow(max_window, initial=cwnd)
    w.state.ssthresh = cwnd
    w.state.ceiling = ceiling
    p = Pipe(w)
    for t in p.flight:
        t.level = cwnd  # each sent with the window full, as in a steady state
    return w, p


def test_a_burst_of_429_from_one_round_trip_decreases_once() -> None:
    w, p = steady(64, 32)
    p.round_trip("congested")  # every call of the round trip is refused
    assert w.limit == 16  # x0.5 once, not 0.5**32
    assert w.state.ceiling == 32


def test_the_decrease_starts_from_the_level_the_refused_call_was_sent_at() -> None:
    w, p = steady(64, 20)
    for _ in range(5):
        p.answer("ok")  # +1/20 each: 20.25
    p.flight[0].level = 18  # as if sent with 18 in flight
    refused = p.answer("congested")
    assert w.state.ceiling == 18
    assert w.cwnd == pytest.approx(18 * lim.AIMD_BETA)
    assert w.state.ssthresh == pytest.approx(0.9 * 18)
    before = refused.seq
    while p.flight and p.flight[0].seq <= before + 10:
        p.answer("congested")  # sent before the decrease: no second decrease
    assert w.cwnd == pytest.approx(9.0)
    # Slow start regrows it by one per success to 0.9 x the level that failed (16.2) ...
    for expected in (10, 11, 12, 13, 14, 15, 16, 16.2):
        p.answer("ok")
        assert w.cwnd == pytest.approx(expected)
    # ... and then by one per window of successes.
    p.answer("ok")
    assert w.cwnd == pytest.approx(16.2 + 1 / 16.2)


def test_additive_increase_is_one_per_window_of_successes() -> None:
    w, p = steady(100, 10)
    p.round_trip()
    assert w.cwnd == pytest.approx(11.0, abs=0.05)
    p.round_trip()
    assert w.cwnd == pytest.approx(12.0, abs=0.2)


def test_near_the_ceiling_probes_are_rare_and_a_failed_probe_costs_little() -> None:
    w, p = steady(100, 10, ceiling=11)  # a 429 was seen with 11 in flight
    ok = 0
    while w.limit < 11:
        p.answer("ok")
        ok += 1
    # One more in flight only after hundreds of successes (~1 refused call per probe).
    assert ok >= lim.AIMD_PROBE_CALLS
    assert p.flight[-1].level == 11
    while len(p.flight) > 1:
        p.answer("ok", refill=False)
    p.answer("congested")  # the probe at 11 fails
    assert w.limit == 10  # x0.95 of 11 (near the ceiling), not x0.5
    assert w.state.ceiling == 11


def test_a_429_far_below_the_ceiling_halves() -> None:
    w, p = steady(100, 60, ceiling=60)
    p.flight[0].level = 30  # refused with 30 in flight: the capacity fell
    p.answer("congested")
    assert w.cwnd == pytest.approx(15.0)
    assert w.state.ceiling == 30


def test_capacity_that_grew_is_found() -> None:
    w, p = steady(100, 10, ceiling=11)
    for _ in range(100):
        p.round_trip()
        if w.state.ceiling == 0:
            break
    assert w.state.ceiling == 0  # the probe at 11 worked, then 12: the ceiling is forgotten
    assert w.limit == 12
    p.round_trip()
    assert w.limit == 13  # back to +1 per round trip


def test_bounds_one_and_max() -> None:
    w, p = steady(8, 2)
    for _ in range(10):
        p.round_trip("congested")  # x0.5 or x0.95 per round trip
    assert w.limit == 1 and w.cwnd == 1.0
    rounds = 0
    while w.limit < 8 and rounds < 5000:
        p.round_trip()
        rounds += 1
    for _ in range(50):
        p.round_trip()
    assert w.limit == 8


def test_other_errors_and_an_idle_window_teach_nothing() -> None:
    w = AIMDWindow(64, initial=8)
    Pipe(w).round_trip("other")
    assert w.cwnd == 8
    w = AIMDWindow(64, initial=8)
    # One call at a time uses an eighth of the window: it says nothing about the server.
    for _ in range(50):
        t = w.acquire()
        t.outcome = "ok"
        w.release(t)
    assert w.cwnd == 8


# --- on or off -----------------------------------------------------------------------


def test_on_by_default_and_off_where_limits_are_configured() -> None:
    assert RateLimiter().adaptive
    assert RateLimiter().concurrency_window() == 4
    assert not RateLimiter(requests_per_minute=600).adaptive
    assert not RateLimiter(tokens_per_minute=90_000).adaptive
    assert RateLimiter(requests_per_minute=600, adaptive_concurrency=True).adaptive
    assert not RateLimiter(adaptive_concurrency=False).adaptive
    assert RateLimiter(adaptive_concurrency=False).concurrency_window() is None


def test_limits_learnt_from_headers_turn_it_off_unless_asked_for() -> None:
    auto = RateLimiter()
    auto.learn({"content-type": "application/json"})
    assert auto.adaptive  # headers without limits change nothing
    auto.learn({"x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "499"})
    assert not auto.adaptive and auto.rpm == pytest.approx(500)
    forced = RateLimiter(adaptive_concurrency=True)
    forced.learn({"x-ratelimit-limit-tokens": "90000"})
    assert forced.adaptive and forced.tpm == pytest.approx(90_000)


def test_config_key_reaches_the_client() -> None:
    base = {"model": "m", "openai_api_key": "k", "instructors": {"general": {"count": 1}}}
    assert Config.model_validate(base).adaptive_concurrency is None
    assert make_llm(Config.model_validate(base)).limiter.adaptive
    off = Config.model_validate({**base, "adaptive_concurrency": False})
    assert not make_llm(off).limiter.adaptive
    limited = Config.model_validate({**base, "requests_per_minute": 60})
    assert not make_llm(limited).limiter.adaptive


# --- the gate -----------------------------------------------------------------------


async def test_the_gate_holds_calls_in_flight_to_the_window() -> None:
    limiter = RateLimiter(max_concurrency=32)
    in_flight = peak = 0

    async def call(outcome: lim.Outcome) -> None:
        nonlocal in_flight, peak
        async with limiter.slot(1) as ticket:
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.02)
            in_flight -= 1
            ticket.outcome = outcome

    await asyncio.gather(*(call("other") for _ in range(20)))
    assert peak == 4  # the initial window, never the 32 allowed
    await asyncio.gather(*(call("ok") for _ in range(40)))
    assert limiter.concurrency_window() is not None
    assert limiter.concurrency_window() > 4  # grown by successes
    # A refusal shrinks it, and the next calls are held to the smaller window.
    before = limiter.concurrency_window()
    async with limiter.slot(1) as ticket:
        ticket.outcome = "congested"
    after = limiter.concurrency_window()
    assert after is not None and before is not None and after < before
    peak = 0
    await asyncio.gather(*(call("other") for _ in range(3 * after)))
    assert peak == after


async def test_a_cancelled_waiter_gives_its_place_back() -> None:
    limiter = RateLimiter(max_concurrency=8, initial_window=1)
    release = asyncio.Event()

    async def holder() -> None:
        async with limiter.slot(1):
            await release.wait()

    h = asyncio.create_task(holder())
    await asyncio.sleep(0.01)
    waiter = asyncio.create_task(holder())
    await asyncio.sleep(0.01)
    waiter.cancel()
    release.set()
    await h
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert limiter.window is not None and limiter.window.in_flight == 0
    async with asyncio.timeout(1):
        async with limiter.slot(1):
            pass


async def test_turning_it_off_lets_waiters_go() -> None:
    limiter = RateLimiter(max_concurrency=8, initial_window=1)
    release = asyncio.Event()
    entered = 0

    async def call() -> None:
        nonlocal entered
        async with limiter.slot(1):
            entered += 1
            await release.wait()

    tasks = [asyncio.create_task(call()) for _ in range(3)]
    await asyncio.sleep(0.02)
    assert entered == 1
    limiter.learn({"x-ratelimit-limit-requests": "100000"})
    await asyncio.sleep(0.02)
    assert entered == 3
    release.set()
    await asyncio.gather(*tasks)


# --- shown ---------------------------------------------------------------------------


def test_the_window_is_shown_in_progress_and_metrics() -> None:
    from types import SimpleNamespace

    from prometheus_client import REGISTRY

    from airoboros.cli.progress import concurrency_line

    limiter = RateLimiter(max_concurrency=64)
    gen: Any = SimpleNamespace(llm=SimpleNamespace(limiter=limiter))
    assert concurrency_line(gen) == "concurrency 4/64 (adaptive)"
    assert REGISTRY.get_sample_value("airoboros_llm_concurrency_window") == 4
    w = limiter.window
    assert w is not None
    p = Pipe(w)
    p.round_trip()
    limiter._window_release(w.acquire())  # the gauge follows each change
    assert concurrency_line(gen) == f"concurrency {w.limit}/64 (adaptive)"
    assert REGISTRY.get_sample_value("airoboros_llm_concurrency_window") == w.limit == 8
    fixed: Any = SimpleNamespace(llm=SimpleNamespace(limiter=RateLimiter(requests_per_minute=60)))
    assert concurrency_line(fixed) == ""
    assert REGISTRY.get_sample_value("airoboros_llm_concurrency_window") == 32
