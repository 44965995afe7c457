"""Token and money accounting per instructor, and the budget that stops new calls."""

from __future__ import annotations

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

    # Async forms, which the LLM client uses: a shared meter (Redis) overrides these.
    async def acheck(self) -> None:
        self.check()

    async def arecord(
        self, instructor: str, model: str, prompt_tokens: int, completion_tokens: int
    ) -> Usage:
        return self.record(instructor, model, prompt_tokens, completion_tokens)
