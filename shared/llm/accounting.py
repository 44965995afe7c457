"""Token and money accounting per instructor, and the budget that caps what is billed.

The budget is a cap, not a trigger: before each call its worst case (estimated prompt
tokens plus the most it may complete, and their price) is reserved, and the call is only
sent when the tokens and money used plus every reservation in flight plus its own fit in
``max_tokens`` / ``max_cost``; the last calls are sent with max_tokens lowered to what is
left. The reservation is settled with the true usage when the answer comes back, or
released when the call fails.
"""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict
from dataclasses import dataclass

from airoboros.config import Price
from airoboros.errors import BudgetExhausted


@dataclass
class Usage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class UsageMeter:
    """Counts usage per instructor; ``check()`` raises once a budget is reached."""

    def __init__(
        self,
        *,
        max_tokens: int | None = None,
        max_cost: float | None = None,
        prices: dict[str, Price] | None = None,
    ) -> None:
        self.max_tokens = max_tokens
        self.max_cost = max_cost
        self.prices = prices or {}
        self.by_instructor: dict[str, Usage] = defaultdict(Usage)
        self.total = Usage()
        #: worst cases of the calls in flight: call id -> (tokens, cost)
        self._held: dict[str, tuple[int, float]] = {}
        self._settled = asyncio.Condition()

    @property
    def limited(self) -> bool:
        return self.max_tokens is not None or self.max_cost is not None

    def preload(self, instructor: str, usage: Usage) -> None:
        """Restore counters from the store when a job resumes (budgets span restarts)."""
        u = self.by_instructor[instructor]
        for f in ("requests", "prompt_tokens", "completion_tokens"):
            setattr(u, f, getattr(u, f) + getattr(usage, f))
            setattr(self.total, f, getattr(self.total, f) + getattr(usage, f))
        u.cost += usage.cost
        self.total.cost += usage.cost

    def price(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        p = self.prices.get(model)
        if p is None:
            return 0.0
        return (prompt_tokens * p.prompt + completion_tokens * p.completion) / 1_000_000

    def record(
        self, instructor: str, model: str, prompt_tokens: int, completion_tokens: int
    ) -> Usage:
        """Add one call's usage; returns that call's Usage (with its cost)."""
        cost = self.price(model, prompt_tokens, completion_tokens)
        call = Usage(1, prompt_tokens, completion_tokens, cost)
        for u in (self.by_instructor[instructor], self.total):
            u.requests += 1
            u.prompt_tokens += prompt_tokens
            u.completion_tokens += completion_tokens
            u.cost += cost
        return call

    @property
    def exhausted(self) -> str | None:
        if self.max_tokens is not None and self.total.total_tokens >= self.max_tokens:
            return f"token budget of {self.max_tokens} reached ({self.total.total_tokens} used)"
        if self.max_cost is not None and self.total.cost >= self.max_cost:
            return f"cost budget of ${self.max_cost:.2f} reached (${self.total.cost:.4f} spent)"
        return None

    def check(self) -> None:
        reason = self.exhausted
        if reason:
            raise BudgetExhausted(reason)

    def completion_room(
        self,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        used_tokens: int,
        used_cost: float,
    ) -> int:
        """The most completion tokens (up to ``completion_tokens``) a call with this prompt
        may take given what is used and held: negative when not even its prompt fits."""
        room = completion_tokens
        if self.max_tokens is not None:
            room = min(room, self.max_tokens - used_tokens - prompt_tokens)
        if self.max_cost is not None:
            pp, cp = self.per_token(model)
            left = self.max_cost - used_cost - prompt_tokens * pp
            if cp > 0:
                room = min(room, math.floor(left / cp + 1e-6))
            elif left < 0:
                room = -1
        return room

    def per_token(self, model: str) -> tuple[float, float]:
        """USD per prompt token and per completion token (0 for a model with no price)."""
        p = self.prices.get(model)
        return (p.prompt / 1_000_000, p.completion / 1_000_000) if p else (0.0, 0.0)

    def _refusal(self, tokens: int, cost: float) -> BudgetExhausted:
        t = self.total
        if self.max_tokens is not None and t.total_tokens + tokens > self.max_tokens:
            return BudgetExhausted(
                f"token budget of {self.max_tokens} reached ({t.total_tokens} used; the "
                f"next call needs at least {tokens})"
            )
        return BudgetExhausted(
            f"cost budget of ${self.max_cost:.2f} reached (${t.cost:.4f} spent; the next "
            f"call costs at least ${cost:.4f})"
        )

    # Async forms, which the LLM client uses: a shared meter (Redis) overrides these.
    async def acheck(self) -> None:
        self.check()

    async def arecord(
        self, instructor: str, model: str, prompt_tokens: int, completion_tokens: int
    ) -> Usage:
        return self.record(instructor, model, prompt_tokens, completion_tokens)

    async def areserve(
        self,
        call_id: str,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        *,
        min_completion: int,
    ) -> int:
        """Hold a call's worst case (its prompt and ``completion_tokens``) against the
        budget before it is sent; returns the completion tokens held. While it does not
        fit but calls in flight may settle below their worst case, it waits; with none in
        flight, it holds what is left if that is at least ``min_completion`` (the caller
        then caps the call at it), else raises BudgetExhausted."""
        if not self.limited:
            return completion_tokens
        least = min(min_completion, completion_tokens)
        async with self._settled:
            while True:
                held_t = sum(t for t, _ in self._held.values())
                held_c = sum(c for _, c in self._held.values())
                room = self.completion_room(
                    model,
                    prompt_tokens,
                    completion_tokens,
                    self.total.total_tokens + held_t,
                    self.total.cost + held_c,
                )
                if room >= completion_tokens or (room >= least and not self._held):
                    self._held[call_id] = (
                        prompt_tokens + room,
                        self.price(model, prompt_tokens, room),
                    )
                    return room
                if not self._held:
                    raise self._refusal(
                        prompt_tokens + least, self.price(model, prompt_tokens, least)
                    )
                await self._settled.wait()

    async def asettle(
        self, call_id: str, instructor: str, model: str, prompt_tokens: int, completion_tokens: int
    ) -> Usage:
        """Record a call's true usage in place of its reservation."""
        call = await self.arecord(instructor, model, prompt_tokens, completion_tokens)
        await self.arelease(call_id)
        return call

    async def arelease(self, call_id: str) -> None:
        """Give a failed call's reservation back."""
        if not self.limited:
            return
        async with self._settled:
            self._held.pop(call_id, None)
            self._settled.notify_all()


def call_cost(
    price: Price | None, prompt_tokens: int, completion_tokens: int, *, discount: float = 1.0
) -> float:
    """USD of one call at ``price`` (per million tokens), times ``discount``: the share a
    Batch API call pays (``Config.batch_discount_for``), 1.0 online. 0 without a price."""
    if price is None:
        return 0.0
    online = (prompt_tokens * price.prompt + completion_tokens * price.completion) / 1_000_000
    return online * discount
