"""One limiter for all LLM calls of a process: concurrency, requests/min, tokens/min.

Requests are paced evenly (a token bucket refilled continuously), so a 600 req/min limit
means one request every 100 ms rather than bursts that trip the server's limiter. A 429
pauses every caller until its Retry-After has passed; nothing here blocks the event loop.
Limits can be learnt from the server's ``x-ratelimit-*`` headers.

For servers that publish no limits (vLLM, TGI, llama.cpp, Ollama) an AIMD window
(``AIMDWindow``) adapts the number of calls in flight to what the server accepts: it
grows on success and shrinks on 429, 503 and timeouts (docs/architecture.md, "Adaptive
concurrency").
"""

from __future__ import annotations

import asyncio
import math
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

from airoboros import metrics


class TokenBucket:
    """A continuously refilled bucket. ``rate`` units per second, at most ``capacity`` saved."""

    def __init__(self, rate: float, capacity: float) -> None:
        self.rate = rate
        self.capacity = max(capacity, 1.0)
        self._level = self.capacity
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self._level = min(self.capacity, self._level + (now - self._stamp) * self.rate)
        self._stamp = now

    def set_rate(self, rate: float, capacity: float) -> None:
        self._refill()
        self.rate = rate
        self.capacity = max(capacity, 1.0)
        self._level = min(self._level, self.capacity)

    async def take(self, amount: float) -> None:
        amount = min(amount, self.capacity)
        # The lock makes waiters queue in arrival order (FIFO pacing).
        async with self._lock:
            while True:
                self._refill()
                if self._level >= amount:
                    self._level -= amount
                    return
                await asyncio.sleep((amount - self._level) / self.rate)

    def give_back(self, amount: float) -> None:
        """Refund (or, when negative, charge) units after the true cost is known."""
        self._refill()
        self._level = min(self.capacity, self._level + amount)


_DURATION = re.compile(
    r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+)ms)?$"
)


def parse_reset(value: str) -> float | None:
    """OpenAI's reset durations: '1s', '6m0s', '20ms', '1h2m3.5s', or plain seconds."""
    value = value.strip()
    try:
        return float(value)
    except ValueError:
        pass
    m = _DURATION.match(value)
    if not m or not any(m.groups()):
        return None
    h, mnt, s, ms = m.groups()
    return float(h or 0) * 3600 + float(mnt or 0) * 60 + float(s or 0) + float(ms or 0) / 1000


#: What one call taught the window: ``ok`` (grow), ``congested`` (429, 503 or a timeout:
#: shrink), ``other`` (any other error: no change; also a call abandoned half way).
Outcome = Literal["ok", "congested", "other"]

#: The window a fresh adaptive limiter starts at (never above max_concurrency).
AIMD_INITIAL = 4
#: Multiplicative decrease the first time the server pushes back, or when it pushes back
#: well below the remembered ceiling (its capacity fell) ...
AIMD_BETA = 0.5
#: ... and when it pushes back near the ceiling (at AIMD_NEAR x ceiling or above: a probe
#: that failed, or a ceiling first measured a little high).
AIMD_BETA_NEAR = 0.95
AIMD_NEAR = 0.8
#: Near the ceiling the window grows by one only every max(AIMD_PROBE_CALLS,
#: AIMD_PROBE_RTTS x window) successes, so probes that fail stay rare (~1 in that many).
AIMD_PROBE_CALLS = 200
AIMD_PROBE_RTTS = 4


@dataclass
class Ticket:
    """One call's hold on the concurrency window."""

    #: order of sending; a decrease is caused only by calls sent after the last one
    seq: int
    #: calls in flight when it was sent, itself included
    level: int
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    #: set by the caller before the slot is left
    outcome: Outcome = "other"


@dataclass
class AIMDState:
    """The window's arithmetic state (mirrored by the Lua of the Redis window)."""

    cwnd: float
    ssthresh: float
    #: the level a congestion signal was last seen at (0: none known)
    ceiling: int = 0
    #: seq of the last call sent before the last decrease
    recovery_seq: int = 0


def aimd_update(
    st: AIMDState,
    outcome: Outcome,
    seq: int,
    level: int,
    in_flight: int,
    last_seq: int,
    max_window: int,
) -> None:
    """Apply one call's outcome to ``st`` (in place). ``level``: the calls in flight when
    this one was sent; ``in_flight``: when its answer came (itself included);
    ``last_seq``: the seq of the latest call sent.

    - success: slow start (+1 per success, the window doubles per round trip) below
      ``ssthresh``; near a known ceiling +1 per max(AIMD_PROBE_CALLS, AIMD_PROBE_RTTS x
      window) successes; elsewhere +1/window (one per round trip). A call answered while
      less than half the window was used teaches nothing about the server and grows
      nothing (so a light load does not inflate the window).
      A window that grows past the ceiling without a 429 forgets it (capacity grew).
    - congestion, for a call sent after the last decrease (so a burst of 429s from one
      round trip decreases once): near the ceiling already known (``level`` at least
      AIMD_NEAR x ceiling) the window is multiplied by AIMD_BETA_NEAR (and is at most
      ``level - 1``) and regrows by +1/window, and the ceiling becomes the lower of the two; elsewhere (none known, or
      far below it: the capacity fell) the window is multiplied by AIMD_BETA, the
      ceiling becomes ``level`` and slow start regrows the window to 0.9 x ``level``.
      (``level`` counts answers the server sent that this process has not read yet, so
      it can exceed the server's count by a few: hence the margins.)
    The window stays within [1, max_window].
    """
    if outcome == "ok":
        limit = max(1, math.floor(st.cwnd))
        if 2 * in_flight >= limit:
            if st.cwnd < st.ssthresh:
                st.cwnd = min(st.cwnd + 1.0, max(st.ssthresh, st.cwnd))
            elif st.ceiling and st.cwnd >= st.ceiling - 1:
                st.cwnd += 1.0 / max(AIMD_PROBE_CALLS, AIMD_PROBE_RTTS * st.cwnd)
            else:
                st.cwnd += 1.0 / st.cwnd
            if st.ceiling and math.floor(st.cwnd) > st.ceiling:
                st.ceiling = 0
    elif outcome == "congested" and seq > st.recovery_seq:
        if st.ceiling and level >= AIMD_NEAR * st.ceiling:
            st.ceiling = min(st.ceiling, level)
            # ... and at most the last level that worked, so the next probe is a whole
            # step of AIMD_PROBE_CALLS successes away (x0.95 of 5 would leave a quarter).
            st.cwnd = min(min(st.cwnd, float(level)) * AIMD_BETA_NEAR, float(level - 1))
            st.ssthresh = st.cwnd
        else:
            st.ceiling = level
            st.cwnd = min(st.cwnd, float(level)) * AIMD_BETA
            st.ssthresh = max(1.0, 0.9 * level)
        st.recovery_seq = last_seq
    st.cwnd = min(max(st.cwnd, 1.0), float(max_window))
    st.ssthresh = min(max(st.ssthresh, 1.0), float(max_window))


class AIMDWindow:
    """An additive-increase, multiplicative-decrease limit on the calls in flight, for
    endpoints that publish no rate limits (see ``aimd_update`` for the rules)."""

    def __init__(self, max_window: int, initial: int | None = None) -> None:
        self.max_window = max_window
        start = min(max_window, initial or AIMD_INITIAL)
        self.state = AIMDState(cwnd=float(start), ssthresh=float(max_window))
        self.in_flight = 0
        self.seq = 0

    @property
    def cwnd(self) -> float:
        return self.state.cwnd

    @property
    def limit(self) -> int:
        """Calls allowed in flight now."""
        return max(1, math.floor(self.state.cwnd))

    def has_room(self) -> bool:
        return self.in_flight < self.limit

    def acquire(self) -> Ticket:
        """Take a place (the caller checked ``has_room``)."""
        self.in_flight += 1
        self.seq += 1
        return Ticket(seq=self.seq, level=self.in_flight)

    def release(self, ticket: Ticket) -> None:
        """Give the place back and learn from the call's outcome."""
        aimd_update(
            self.state,
            ticket.outcome,
            ticket.seq,
            ticket.level,
            self.in_flight,
            self.seq,
            self.max_window,
        )
        self.in_flight = max(0, self.in_flight - 1)


class RateLimiter:
    def __init__(
        self,
        *,
        max_concurrency: int = 32,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        adaptive_concurrency: bool | None = None,
        initial_window: int | None = None,
    ) -> None:
        """``adaptive_concurrency``: True or False forces the AIMD window on or off; None
        (auto) turns it on unless a requests/min or tokens/min limit is configured, and
        off once the server's headers teach one."""
        self._sem = asyncio.Semaphore(max_concurrency)
        self.max_concurrency = max_concurrency
        self._configured_rpm = requests_per_minute
        self._configured_tpm = tokens_per_minute
        self.requests: TokenBucket | None = None
        self.tokens: TokenBucket | None = None
        if requests_per_minute:
            self._set_rpm(requests_per_minute)
        if tokens_per_minute:
            self._set_tpm(tokens_per_minute)
        self._pause_until = 0.0
        self.in_flight = 0
        self.adaptive_setting = adaptive_concurrency
        self.initial_window = initial_window
        on = adaptive_concurrency
        if on is None:
            on = not requests_per_minute and not tokens_per_minute
        self.window: AIMDWindow | None = AIMDWindow(max_concurrency, initial_window) if on else None
        self._waiters: deque[asyncio.Future[Ticket | None]] = deque()
        self._show_window()

    # --- the adaptive window ------------------------------------------------------------
    @property
    def adaptive(self) -> bool:
        """Whether the AIMD window limits the calls in flight."""
        return self.window is not None

    def concurrency_window(self) -> int | None:
        """Calls the adaptive window allows in flight now (None when it is off)."""
        return self.window.limit if self.window is not None else None

    def _show_window(self) -> None:
        shown = self.concurrency_window()
        metrics.LLM_CONCURRENCY_WINDOW.set(shown if shown is not None else self.max_concurrency)

    def stop_adapting(self) -> None:
        """Turn the window off (the header-driven limits rule now); waiters go on."""
        if self.window is None:
            return
        self.window = None
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
        self._show_window()

    async def _window_acquire(self) -> Ticket | None:
        """A place in the window, waiting in arrival order; None when it is off."""
        w = self.window
        if w is None:
            return None
        if not self._waiters and w.has_room():
            return w.acquire()
        fut: asyncio.Future[Ticket | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            # Handed a place in the same tick as the cancellation: give it back.
            if fut.done() and not fut.cancelled() and (t := fut.result()) is not None:
                self._window_release(t)
            raise

    def _window_release(self, ticket: Ticket) -> None:
        w = self.window
        if w is None:
            return
        w.release(ticket)
        # Hand the free places straight to the waiters (a new caller cannot overtake).
        while self._waiters and w.has_room():
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(w.acquire())
        self._show_window()

    def _bucket(self, kind: str, rate: float, capacity: float) -> TokenBucket:
        return TokenBucket(rate, capacity)

    def _set_rpm(self, rpm: float) -> None:
        # Capacity of one request: evenly spaced, never a burst.
        if self.requests is None:
            self.requests = self._bucket("requests", rpm / 60.0, 1.0)
        else:
            self.requests.set_rate(rpm / 60.0, 1.0)

    def _set_tpm(self, tpm: float) -> None:
        # Up to ten seconds' worth of tokens may go out together.
        if self.tokens is None:
            self.tokens = self._bucket("tokens", tpm / 60.0, tpm / 6.0)
        else:
            self.tokens.set_rate(tpm / 60.0, tpm / 6.0)

    @property
    def rpm(self) -> float | None:
        return self.requests.rate * 60 if self.requests else None

    @property
    def tpm(self) -> float | None:
        return self.tokens.rate * 60 if self.tokens else None

    def pause(self, seconds: float) -> None:
        """Hold every new call for ``seconds`` (after a 429 or an exhausted window)."""
        self._pause_until = max(self._pause_until, time.monotonic() + seconds)

    async def _wait_pause(self) -> None:
        while (delay := self._pause_until - time.monotonic()) > 0:
            await asyncio.sleep(delay)

    @asynccontextmanager
    async def slot(self, estimated_tokens: int) -> AsyncIterator[Ticket]:
        """Hold a slot for one request; the body runs the request and sets the ticket's
        ``outcome`` (what the adaptive window learns when the slot is left)."""
        async with self._sem:
            await self._wait_pause()
            if self.tokens is not None:
                await self.tokens.take(estimated_tokens)
            if self.requests is not None:
                await self.requests.take(1)
            await self._wait_pause()
            held = await self._window_acquire()
            ticket = held or Ticket(seq=0, level=self.in_flight + 1)
            self.in_flight += 1
            try:
                yield ticket
            finally:
                self.in_flight -= 1
                if held is not None:
                    self._window_release(held)

    def settle_tokens(self, estimated: int, actual: int) -> None:
        if self.tokens is not None and actual != estimated:
            self.tokens.give_back(estimated - actual)

    def learn(self, headers: Mapping[str, str]) -> None:
        """Adopt the server's limits when none were configured (or theirs are lower);
        pause when the server says a window is spent. A server that publishes limits ends
        the adaptive window unless it was asked for explicitly."""
        h = {k.lower(): v for k, v in headers.items()}
        if (
            self.window is not None
            and self.adaptive_setting is None
            and ("x-ratelimit-limit-requests" in h or "x-ratelimit-limit-tokens" in h)
        ):
            self.stop_adapting()
        try:
            lim_r = h.get("x-ratelimit-limit-requests")
            if lim_r:
                rpm = float(lim_r)
                lower = self._configured_rpm is None or rpm < self._configured_rpm
                if lower and (self.rpm is None or abs(self.rpm - rpm) > 1e-6):
                    self._set_rpm(rpm)
            lim_t = h.get("x-ratelimit-limit-tokens")
            if lim_t:
                tpm = float(lim_t)
                lower = self._configured_tpm is None or tpm < self._configured_tpm
                if lower and (self.tpm is None or abs(self.tpm - tpm) > 1e-6):
                    self._set_tpm(tpm)
            for kind in ("requests", "tokens"):
                remaining = h.get(f"x-ratelimit-remaining-{kind}")
                reset = h.get(f"x-ratelimit-reset-{kind}")
                if remaining is not None and reset and float(remaining) <= 0:
                    secs = parse_reset(reset)
                    if secs:
                        self.pause(secs)
        except ValueError:
            return  # a server sending garbage headers must not break generation
