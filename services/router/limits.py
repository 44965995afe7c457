"""Per-key request rate limit: a token bucket per API key (per client address when the
router has no keys), refilled at ``per_minute / 60`` requests a second, holding at most
``burst`` (by default a minute's worth, so the limit is exactly ``per_minute`` in any
minute that starts with a full bucket)."""

from __future__ import annotations

import time


class ClientRateLimiter:
    def __init__(self, per_minute: int, burst: int | None = None, max_keys: int = 100_000) -> None:
        self.rate = per_minute / 60.0
        self.capacity = float(burst if burst is not None else per_minute)
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def check(self, key: str, now: float | None = None) -> float | None:
        """Take one request from ``key``'s bucket: None if allowed, else the seconds until
        one is (the Retry-After)."""
        if not self.enabled:
            return None
        now = time.monotonic() if now is None else now
        tokens, stamp = self._buckets.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - stamp) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > self.max_keys:
                self._prune(now)
            return None
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def _prune(self, now: float) -> None:
        """Forget keys whose bucket has refilled: they are as if never seen."""
        full = [
            k for k, (t, s) in self._buckets.items() if t + (now - s) * self.rate >= self.capacity
        ]
        for k in full:
            del self._buckets[k]
