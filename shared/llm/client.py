"""LLMClient: chat and completions over any OpenAI-compatible endpoint.

Retries use exponential backoff with full jitter, honour Retry-After, and are bounded in
attempts and in time. Errors are classified; the non-retryable (bad request, auth,
context length, quota) fail at once. Every call is counted against the job's budget.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx2  # the transport of the openai SDK (a maintained fork of httpx)
import openai
from opentelemetry.trace import SpanKind

from airoboros import metrics, telemetry
from airoboros.errors import (
    AuthError,
    BadRequestError,
    BudgetExhausted,
    ConnectError,
    ContextLengthError,
    LLMError,
    LLMTimeoutError,
    ModelNotFoundError,
    RateLimitError,
    ServerError,
)
from airoboros.llm.accounting import UsageMeter
from airoboros.llm.limiter import RateLimiter
from airoboros.llm.structured import StructuredSupport

log = logging.getLogger(__name__)

DEFAULT_SYSTEM = "A chat."


@dataclass
class LLMSettings:
    base_url: str | None = None
    api_key: str | None = None
    organization: str | None = None
    api: str = "chat"
    timeout: float = 600.0
    max_retries: int = 6
    max_retry_time: float = 300.0
    #: default max tokens per completion (None: leave it to the server)
    max_completion_tokens: int | None = None
    backoff_base: float = 1.0
    backoff_cap: float = 30.0


@dataclass
class Completion:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cost: float
    model: str
    attempts: int = 1
    #: 429 answers met on the way
    rate_limited: int = 0


@dataclass
class ClientStats:
    calls: int = 0
    attempts: int = 0
    rate_limited: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def retries(self) -> int:
        return self.attempts - self.calls


#: Completion tokens reserved for a call with no max_tokens before any answer was seen;
#: after that, 1.5x the largest completion seen (at least COMPLETION_FLOOR).
FIRST_COMPLETION_GUESS = 1024
COMPLETION_FLOOR = 256
#: The shortest answer a call is capped at to fit the rest of a budget; below it the
#: budget counts as spent.
MIN_COMPLETION = 128


class WorstCase:
    """Upper estimates of one call's usage, for the budget's reservations: prompt tokens
    from the largest tokens-per-character ratio seen (half a token per character, a
    generous bound for English and code, before the first answer), completion tokens from
    the call's max_tokens, else 1.5x the largest completion of that instructor's calls
    seen so far (at least ``COMPLETION_FLOOR``; ``FIRST_COMPLETION_GUESS`` before its
    first answer)."""

    def __init__(self) -> None:
        self.tokens_per_char = 0.5
        self._seen_ratio = 0.0
        #: per instructor: its calls differ (20 trivia pairs, a one-line riddle answer)
        self.largest_completion: dict[str, int] = {}

    def prompt(self, messages: list[dict[str, str]]) -> int:
        chars = sum(len(m["content"]) for m in messages)
        # A few tokens per message of chat formatting, as OpenAI's tokenizers add.
        return math.ceil(chars * self.tokens_per_char) + 4 * len(messages) + 8

    def completion(self, max_tokens: int | None, instructor: str) -> int:
        if max_tokens is not None:
            return max_tokens
        largest = self.largest_completion.get(instructor)
        if not largest:
            return FIRST_COMPLETION_GUESS
        return max(COMPLETION_FLOOR, math.ceil(1.5 * largest))

    def learn(
        self, messages: list[dict[str, str]], instructor: str, prompt_tokens: int, completion: int
    ) -> None:
        chars = sum(len(m["content"]) for m in messages)
        if chars >= 32 and prompt_tokens > 0:
            self._seen_ratio = max(self._seen_ratio, prompt_tokens / chars)
            self.tokens_per_char = self._seen_ratio * 1.15
        seen = self.largest_completion.get(instructor, 0)
        self.largest_completion[instructor] = max(seen, completion)


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if ra:
        try:
            return float(ra)
        except ValueError:
            return None
    return None


def classify(exc: Exception) -> LLMError:
    """Map an SDK/transport exception onto our error tree."""
    if isinstance(exc, LLMError):
        return exc
    if isinstance(exc, openai.APITimeoutError):
        return LLMTimeoutError(f"request timed out: {exc}")
    if isinstance(exc, openai.APIConnectionError):
        return ConnectError(f"cannot connect to the LLM endpoint: {exc.__cause__ or exc}")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        body = str(exc.message or "")
        code = ""
        if isinstance(exc.body, dict):
            code = str(exc.body.get("code") or exc.body.get("type") or "")
        text = f"{code} {body}".lower()
        if status == 429:
            if "insufficient_quota" in text or "quota" in code:
                return AuthError(f"quota exhausted: {body}", status=status)
            return RateLimitError(
                f"rate limited: {body}",
                status=status,
                retry_after=_retry_after(exc.response.headers),
            )
        if "context_length" in text or "maximum context" in text or "context length" in text:
            return ContextLengthError(body, status=status)
        if status == 404:
            return ModelNotFoundError(f"model or route not found (404): {body}", status=status)
        if status in (401, 403):
            return AuthError(f"authentication failed ({status}): {body}", status=status)
        if status in (408, 409) or status >= 500:
            err = ServerError(f"server error {status}: {body}", status=status)
            return err
        return BadRequestError(f"bad request ({status}): {body}", status=status)
    if isinstance(exc, TimeoutError):
        return LLMTimeoutError(str(exc) or "timed out")
    if isinstance(exc, OSError):
        return ConnectError(f"cannot connect to the LLM endpoint: {exc}")
    return ServerError(f"unexpected error: {type(exc).__name__}: {exc}")


def congestion(err: LLMError) -> bool:
    """Whether a failure says the endpoint is overloaded (the adaptive window shrinks):
    429 (not a spent quota), 503, or a timeout."""
    if isinstance(err, RateLimitError | LLMTimeoutError):
        return True
    return isinstance(err, ServerError) and err.status == 503


def messages_to_prompt(messages: list[dict[str, str]]) -> str:
    """The airoboros chat format, for the completions API."""
    system = DEFAULT_SYSTEM
    lines: list[str] = []
    for m in messages:
        if m["role"] == "system":
            system = m["content"]
        elif m["role"] == "user":
            lines.append(f"USER: {m['content']}")
        else:
            lines.append(f"ASSISTANT: {m['content']}")
    return system + "\n" + "\n".join(lines) + "\nASSISTANT:"


class LLMClient:
    def __init__(self, settings: LLMSettings, limiter: RateLimiter, meter: UsageMeter) -> None:
        self.settings = settings
        self.limiter = limiter
        self.meter = meter
        self.stats = ClientStats()
        self.worst = WorstCase()
        #: set when the first request has been sent (start-up work waits for it)
        self.first_sent = asyncio.Event()
        #: whether calls may ask for a JSON schema (``structured_output``)
        self.structured = StructuredSupport(self)
        self._client = openai.AsyncOpenAI(
            api_key=settings.api_key or "not-needed",
            base_url=settings.base_url,
            organization=settings.organization,
            timeout=settings.timeout,
            max_retries=0,  # retries are ours: bounded, jittered, limiter-aware
            http_client=openai.DefaultAsyncHttpxClient(
                timeout=settings.timeout,
                limits=httpx2.Limits(
                    max_connections=max(limiter.max_concurrency, 10),
                    max_keepalive_connections=max(limiter.max_concurrency, 10),
                ),
            ),
        )

    async def close(self) -> None:
        await self._client.close()

    async def preflight(self, model: str) -> str | None:
        """Check the endpoint is reachable and the key accepted. Raises ConnectError or
        AuthError; returns a warning when the model is not listed (local servers often
        alias names, so that is not fatal)."""
        try:
            page = await asyncio.wait_for(self._client.models.list(), timeout=15)
        except openai.NotFoundError:
            return None  # some compatible servers have no /models
        except Exception as exc:
            err = classify(exc)
            if isinstance(err, ConnectError | AuthError | LLMTimeoutError):
                raise err from None
            return None
        ids = {m.id for m in page.data}
        if ids and model not in ids:
            return f"model {model!r} is not listed by the endpoint (it lists {len(ids)} models)"
        return None

    def _estimate(self, messages: list[dict[str, str]], max_tokens: int | None) -> int:
        chars = sum(len(m["content"]) for m in messages)
        return chars // 4 + (max_tokens or 512)

    async def complete(
        self,
        messages: list[dict[str, str]],
        *,
        model: str,
        instructor: str,
        params: dict[str, Any] | None = None,
    ) -> Completion:
        """One completion, retried as needed. Raises BudgetExhausted before any call once
        the budget is spent, and LLMError when the call cannot succeed. ``params`` go to
        the SDK as they are (``response_format`` included, chat API only)."""
        params = dict(params or {})
        max_tokens = params.pop("max_tokens", None) or self.settings.max_completion_tokens
        deadline = time.monotonic() + self.settings.max_retry_time
        attempt = 0
        rate_limited = 0
        self.stats.calls += 1
        while True:
            await self.meter.acheck()
            attempt += 1
            self.stats.attempts += 1
            estimate = self._estimate(messages, max_tokens)
            call_id = uuid.uuid4().hex
            reserved = False
            try:
                async with self.limiter.slot(estimate) as ticket:
                    await self.meter.acheck()
                    # The budget is a cap: the call's worst case is held before it is sent,
                    # and a call that fits only with a shorter answer is capped at it.
                    worst_c = self.worst.completion(max_tokens, instructor)
                    held = await self.meter.areserve(
                        call_id,
                        model,
                        self.worst.prompt(messages),
                        worst_c,
                        min_completion=MIN_COMPLETION,
                    )
                    reserved = True
                    cap = held if held < worst_c else max_tokens
                    with telemetry.span(
                        f"chat {model}",
                        kind=SpanKind.CLIENT,
                        attributes={
                            "gen_ai.system": "openai",
                            "gen_ai.operation.name": "chat",
                            "gen_ai.request.model": model,
                            "airoboros.instructor": instructor,
                            "airoboros.attempt": attempt,
                        },
                    ) as span:
                        started = time.perf_counter()
                        self.first_sent.set()
                        try:
                            text, finish, usage, headers = await self._call(
                                messages, model=model, params=params, max_tokens=cap
                            )
                        except Exception as exc:
                            failure = classify(exc)
                            ticket.outcome = "congested" if congestion(failure) else "other"
                            metrics.LLM_REQUESTS.labels(model, instructor, failure.code).inc()
                            raise
                        finally:
                            metrics.LLM_SECONDS.labels(model).observe(time.perf_counter() - started)
                        ticket.outcome = "ok"
                        span.set_attribute("gen_ai.usage.input_tokens", usage[0])
                        span.set_attribute("gen_ai.usage.output_tokens", usage[1])
                self.limiter.learn(headers)
                prompt_t, completion_t = usage
                self.limiter.settle_tokens(estimate, prompt_t + completion_t)
                self.worst.learn(messages, instructor, prompt_t, completion_t)
                call = await self.meter.asettle(call_id, instructor, model, prompt_t, completion_t)
                reserved = False
                metrics.LLM_REQUESTS.labels(model, instructor, "ok").inc()
                metrics.LLM_TOKENS.labels(model, instructor, "prompt").inc(prompt_t)
                metrics.LLM_TOKENS.labels(model, instructor, "completion").inc(completion_t)
                metrics.LLM_COST.labels(model, instructor).inc(call.cost)
                return Completion(
                    text, finish, prompt_t, completion_t, call.cost, model, attempt, rate_limited
                )
            except asyncio.CancelledError:
                if reserved:  # give the reservation back even when the call is abandoned
                    await self.meter.arelease(call_id)
                raise
            except Exception as exc:
                if reserved:
                    await self.meter.arelease(call_id)
                if isinstance(exc, BudgetExhausted):
                    raise
                err = classify(exc)
                self.stats.errors[err.code] = self.stats.errors.get(err.code, 0) + 1
                if isinstance(err, RateLimitError):
                    rate_limited += 1
                    self.stats.rate_limited += 1
                if not err.retryable:
                    raise err from None
                remaining = deadline - time.monotonic()
                if attempt > self.settings.max_retries or remaining <= 0:
                    raise type(err)(
                        f"{err} (gave up after {attempt} attempts)", status=err.status
                    ) from None
                delay = min(
                    self.settings.backoff_cap, self.settings.backoff_base * 2 ** (attempt - 1)
                )
                delay = random.uniform(0, delay)  # full jitter
                if isinstance(err, RateLimitError) and (
                    err.retry_after is not None or not self.limiter.adaptive
                ):
                    wait = err.retry_after if err.retry_after is not None else max(delay, 1.0)
                    self.limiter.pause(wait)  # everyone waits, not just this call
                    delay = max(delay, wait)
                # (A 429 with no Retry-After under the adaptive window pauses no one: the
                # window was cut as the call left its slot; this call backs off alone.)
                if delay > remaining:
                    raise type(err)(
                        f"{err} (retry budget of {self.settings.max_retry_time:.0f}s spent)",
                        status=err.status,
                    ) from None
                log.info(
                    "%s: call %s (%s); retry %d of %d in %.1f s",
                    instructor,
                    "rate limited" if isinstance(err, RateLimitError) else "failed",
                    f"status {err.status}" if err.status else err.code,
                    attempt,
                    self.settings.max_retries,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _call(
        self,
        messages: list[dict[str, str]],
        *,
        model: str,
        params: dict[str, Any],
        max_tokens: int | None,
    ) -> tuple[str, str | None, tuple[int, int], Mapping[str, str]]:
        extra: dict[str, Any] = {}
        if max_tokens is not None:
            extra["max_tokens"] = max_tokens
        if self.settings.api == "completions":
            # The completions API has no response_format: callers fall back to markers.
            params = {k: v for k, v in params.items() if k != "response_format"}
            raw = await self._client.completions.with_raw_response.create(
                model=model,
                prompt=messages_to_prompt(messages),
                extra_headers=telemetry.inject({}),
                **params,
                **extra,
            )
            resp: Any = raw.parse()
            choice = resp.choices[0] if resp.choices else None
            text = choice.text if choice else ""
        else:
            raw = await self._client.chat.completions.with_raw_response.create(
                model=model,
                messages=messages,  # type: ignore[arg-type]
                extra_headers=telemetry.inject({}),
                **params,
                **extra,
            )
            resp = raw.parse()
            choice = resp.choices[0] if resp.choices else None
            text = (choice.message.content or "") if choice else ""
        if choice is None:
            raise ServerError("the endpoint returned no choices")
        usage = resp.usage
        if usage is not None:
            tokens = (int(usage.prompt_tokens or 0), int(usage.completion_tokens or 0))
        else:  # some servers omit usage: estimate so budgets still hold
            tokens = (sum(len(m["content"]) for m in messages) // 4, len(text) // 4)
        return text, choice.finish_reason, tokens, raw.headers
