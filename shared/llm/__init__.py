"""The LLM client: any OpenAI-compatible endpoint through the official SDK, with one
limiter (concurrency, requests/min, tokens/min), bounded retries and cost accounting."""

from airoboros.llm.accounting import UsageMeter
from airoboros.llm.client import Completion, LLMClient, LLMSettings
from airoboros.llm.filters import ResponseFilter
from airoboros.llm.limiter import RateLimiter

__all__ = ["Completion", "LLMClient", "LLMSettings", "RateLimiter", "ResponseFilter", "UsageMeter"]
