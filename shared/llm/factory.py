"""An LLM client built from a job's config: its endpoint, limits, retries and budget."""

from __future__ import annotations

from airoboros.config import Config, Price
from airoboros.llm.accounting import UsageMeter
from airoboros.llm.client import LLMClient, LLMSettings
from airoboros.llm.limiter import RateLimiter


def prices_for(config: Config) -> dict[str, Price]:
    """The price of every model the config's calls may use (for max_cost and reports)."""
    models = {config.model, *(config.model_for(n) for n in config.instructors)}
    return {m: p for m in models if (p := config.price_for(m)) is not None}


def make_llm(
    config: Config,
    *,
    limiter: RateLimiter | None = None,
    meter: UsageMeter | None = None,
) -> LLMClient:
    """An LLM client for ``config``; deployed workers pass shared (Redis) limits."""
    if meter is None:
        meter = UsageMeter(
            max_tokens=config.max_tokens, max_cost=config.max_cost, prices=prices_for(config)
        )
    if limiter is None:
        limiter = RateLimiter(
            max_concurrency=config.max_concurrency,
            requests_per_minute=config.requests_per_minute,
            tokens_per_minute=config.tokens_per_minute,
            adaptive_concurrency=config.adaptive_concurrency,
        )
    settings = LLMSettings(
        base_url=config.resolved_base_url(),
        api_key=config.resolved_api_key(),
        organization=config.organization_id,
        api=config.api,
        timeout=config.request_timeout,
        max_retries=config.max_retries,
        max_retry_time=config.max_retry_time,
        max_completion_tokens=config.max_completion_tokens,
    )
    return LLMClient(settings, limiter, meter)
