"""One limiter for all LLM calls of a process: concurrency, requests/min, tokens/min.

Requests are paced evenly (a token bucket refilled continuously), so a 600 req/min limit
means one request every 100 ms rather than bursts that trip the server's limiter. A 429
pauses every caller until its Retry-After has passed; nothing here blocks the event loop.
Limits can be learnt from the server's ``x-ratelimit-*`` headers.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager


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


class RateLimiter:
    def __init__(
        self,
        *,
        max_concurrency: int = 32,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
    ) -> None:
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
    async def slot(self, estimated_tokens: int) -> AsyncIterator[None]:
        """Hold a slot for one request; the body runs the request."""
        async with self._sem:
            await self._wait_pause()
            if self.tokens is not None:
                await self.tokens.take(estimated_tokens)
            if self.requests is not None:
                await self.requests.take(1)
            await self._wait_pause()
            self.in_flight += 1
            try:
                yield
            finally:
                self.in_flight -= 1

    def settle_tokens(self, estimated: int, actual: int) -> None:
        if self.tokens is not None and actual != estimated:
            self.tokens.give_back(estimated - actual)

    def learn(self, headers: Mapping[str, str]) -> None:
        """Adopt the server's limits when none were configured (or theirs are lower);
        pause when the server says a window is spent."""
        h = {k.lower(): v for k, v in headers.items()}
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
