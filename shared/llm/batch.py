"""The Batch API lane: call keys, the JSONL a batch job is made of, the client that submits
and reads batch jobs (the official ``openai`` SDK does the HTTP), and ``ReplayLLM``, the
stand-in for ``LLMClient`` that a batch instructor's command runs against.

How a call goes through the lane (docs/batch.md): the generator runs a command with a
``ReplayLLM`` holding the answers the command carries. A call whose answer is there is
answered at once (replay); any other call is recorded and fails with ``CallDeferred``,
and the generator reports the recorded calls (``CallsDeferred``) instead of candidates.
The controller submits them as a batch job, and when it has their answers, sends the same
command again with them attached. Instructors are deterministic for a command (their
random choices are seeded by its task id), so the replay asks the same calls again, and
gets further, until nothing is missing.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import openai

from airoboros.config import Config
from airoboros.contracts import BatchAnswer, DeferredCall
from airoboros.errors import BudgetExhausted, LLMError, ServerError
from airoboros.llm.accounting import call_cost
from airoboros.llm.client import Completion, classify, messages_to_prompt

#: the states in which a batch job still runs (OpenAI's names)
OPEN_STATES = ("validating", "in_progress", "finalizing", "cancelling")
#: every state in which a batch job is over
FINAL_STATES = ("completed", "failed", "expired", "cancelled")
#: an answer's ``error`` when the budget could not hold its batch
BUDGET_ERROR = "budget_exhausted"


def call_key(task_id: str, occurrence: int, body: Mapping[str, Any]) -> str:
    """The stable key of one call of a command: its task, which occurrence of this very
    request within the command it is (two identical requests are two samples), and the
    request's body. It is the ``custom_id`` of its line in a batch job."""
    blob = json.dumps([task_id, occurrence, body], sort_keys=True, ensure_ascii=False)
    return "c-" + hashlib.sha256(blob.encode()).hexdigest()[:40]


def endpoint_for(config: Config) -> str:
    return "/v1/completions" if config.api == "completions" else "/v1/chat/completions"


# --- JSONL ------------------------------------------------------------------------------


def write_jsonl(calls: Iterable[DeferredCall], endpoint: str) -> bytes:
    """The input file of a batch job: one request per line, ``custom_id`` its call key.
    A key given twice is written once (both callers share its answer)."""
    out = io.StringIO()
    seen: set[str] = set()
    for call in calls:
        if call.key in seen:
            continue
        seen.add(call.key)
        line = {"custom_id": call.key, "method": "POST", "url": endpoint, "body": call.body}
        out.write(json.dumps(line, ensure_ascii=False) + "\n")
    return out.getvalue().encode()


@dataclass
class LineResult:
    """One line of a batch job's output or error file."""

    key: str
    #: the chat (or completion) answer; None when the line failed
    text: str | None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: why the line failed (its status code, or the error's code and message)
    error: str | None = None


def parse_jsonl(data: bytes | str) -> list[LineResult]:
    """The lines of an output or error file. A line that is not JSON, or names no
    ``custom_id``, is skipped (its call stays unanswered and is submitted again)."""
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    results: list[LineResult] = []
    for raw in text.splitlines():
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
            continue
        key = line["custom_id"]
        response = line.get("response") or {}
        error = line.get("error")
        status = response.get("status_code", 200 if not error else None)
        body = response.get("body") or {}
        if error or status != 200 or not isinstance(body, dict):
            why = error or (body.get("error") if isinstance(body, dict) else None) or {}
            code = why.get("code") if isinstance(why, dict) else None
            message = why.get("message") if isinstance(why, dict) else str(why)
            results.append(
                LineResult(key, None, error=f"{code or status or 'error'}: {message or ''}")
            )
            continue
        choices = body.get("choices") or []
        if not choices:
            results.append(LineResult(key, None, error="no choices in the answer"))
            continue
        choice = choices[0]
        msg = choice.get("message")
        text_ = (msg or {}).get("content") if msg is not None else choice.get("text")
        usage = body.get("usage") or {}
        results.append(
            LineResult(
                key,
                str(text_ or ""),
                choice.get("finish_reason"),
                int(usage.get("prompt_tokens") or 0),
                int(usage.get("completion_tokens") or 0),
            )
        )
    return results


def answer_of(line: LineResult, config: Config, model: str) -> BatchAnswer:
    """A successful line as the answer a command carries, priced at the batch price."""
    cost = call_cost(
        config.price_for(model),
        line.prompt_tokens,
        line.completion_tokens,
        discount=config.batch_discount_for(model),
    )
    return BatchAnswer(
        text=line.text or "",
        finish_reason=line.finish_reason,
        prompt_tokens=line.prompt_tokens,
        completion_tokens=line.completion_tokens,
        cost=cost,
    )


def worst_usage(calls: Iterable[DeferredCall], config: Config) -> tuple[int, float]:
    """The most tokens a batch of ``calls`` can use, and the most it can cost at the batch
    price: prompts at half a token per character (a generous bound), completions at their
    max_tokens (else 4096)."""
    tokens, total = 0, 0.0
    for call in calls:
        body = call.body
        model = str(body.get("model", config.model))
        chars = sum(len(str(m.get("content", ""))) for m in body.get("messages", []))
        chars += len(str(body.get("prompt", "")))
        prompt = math.ceil(chars * 0.5) + 4 * len(body.get("messages", [])) + 8
        completion = int(body.get("max_tokens") or 4096)
        tokens += prompt + completion
        total += call_cost(
            config.price_for(model),
            prompt,
            completion,
            discount=config.batch_discount_for(model),
        )
    return tokens, total


# --- the replaying stand-in for LLMClient -------------------------------------------------


class CallDeferred(Exception):
    """A call of a batch instructor whose answer is not there yet: it is recorded, and
    the command is reported as deferred."""


class ReplayLLM:
    """What a batch instructor's command calls instead of ``LLMClient``: ``complete``
    answers from ``answers`` when the call's key is there, and otherwise records the
    request (``missing``) and raises ``CallDeferred``. It sends nothing anywhere."""

    def __init__(self, config: Config, task_id: str, answers: Mapping[str, BatchAnswer]) -> None:
        self.config = config
        self.task_id = task_id
        self.answers = answers
        self.missing: dict[str, DeferredCall] = {}
        #: (instructor, model, answer) of every call answered from ``answers``
        self.used: list[tuple[str, str, BatchAnswer]] = []
        self._seen: dict[str, int] = {}

    def body(
        self, messages: list[dict[str, str]], model: str, params: Mapping[str, Any]
    ) -> dict[str, Any]:
        body = dict(params)
        max_tokens = body.pop("max_tokens", None) or self.config.max_completion_tokens
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        body["model"] = model
        if self.config.api == "completions":
            body["prompt"] = messages_to_prompt(messages)
        else:
            body["messages"] = messages
        return body

    async def complete(
        self,
        messages: list[dict[str, str]],
        *,
        model: str,
        instructor: str,
        params: dict[str, Any] | None = None,
        **extra: Any,
    ) -> Completion:
        body = self.body(messages, model, {**(params or {}), **extra})
        plain = json.dumps(body, sort_keys=True, ensure_ascii=False)
        n = self._seen.get(plain, 0)
        self._seen[plain] = n + 1
        key = call_key(self.task_id, n, body)
        answer = self.answers.get(key)
        if answer is None:
            self.missing[key] = DeferredCall(key=key, body=body)
            raise CallDeferred(key)
        if answer.error == BUDGET_ERROR:
            raise BudgetExhausted("the budget cannot hold another batch of calls")
        if answer.error is not None:
            raise ServerError(f"batch call failed: {answer.error}")
        self.used.append((instructor, model, answer))
        return Completion(
            answer.text,
            answer.finish_reason,
            answer.prompt_tokens,
            answer.completion_tokens,
            answer.cost,
            model,
        )


# --- the Batch API client -----------------------------------------------------------------


@dataclass
class BatchInfo:
    """What the lane keeps of a batch job."""

    id: str
    status: str
    output_file_id: str | None
    error_file_id: str | None
    metadata: dict[str, str]


def _info(b: Any) -> BatchInfo:
    return BatchInfo(
        id=b.id,
        status=b.status,
        output_file_id=b.output_file_id,
        error_file_id=b.error_file_id,
        metadata=dict(b.metadata or {}),
    )


class BatchClient:
    """Files and batch jobs on an OpenAI-compatible endpoint, over ``openai.AsyncOpenAI``.
    Errors are raised as ``airoboros.errors.LLMError`` (``classify``)."""

    def __init__(
        self, *, base_url: str | None, api_key: str | None, timeout: float = 120.0
    ) -> None:
        self._client = openai.AsyncOpenAI(
            api_key=api_key or "not-needed", base_url=base_url, timeout=timeout, max_retries=3
        )

    @classmethod
    def for_config(cls, config: Config) -> BatchClient:
        return cls(
            base_url=config.resolved_base_url(),
            api_key=config.resolved_api_key(),
            timeout=min(config.request_timeout, 300.0),
        )

    async def close(self) -> None:
        await self._client.close()

    async def upload(self, data: bytes, name: str) -> str:
        """Upload a batch input file; returns its id."""
        try:
            f = await self._client.files.create(file=(name, data), purpose="batch")
        except Exception as exc:
            raise classify(exc) from exc
        return f.id

    async def create(
        self, input_file_id: str, endpoint: str, window: str, metadata: dict[str, str]
    ) -> BatchInfo:
        try:
            b = await self._client.batches.create(
                input_file_id=input_file_id,
                endpoint=endpoint,  # type: ignore[arg-type]
                completion_window=window,  # type: ignore[arg-type]
                metadata=metadata,
            )
        except Exception as exc:
            raise classify(exc) from exc
        return _info(b)

    async def find(self, key: str, value: str) -> BatchInfo | None:
        """The batch job whose metadata has ``key: value`` (made before a crash kept its
        id from the store), or None. Looks at the most recent jobs."""
        try:
            async for b in self._client.batches.list(limit=100):
                if (b.metadata or {}).get(key) == value:
                    return _info(b)
        except Exception as exc:
            raise classify(exc) from exc
        return None

    async def retrieve(self, batch_id: str) -> BatchInfo:
        try:
            return _info(await self._client.batches.retrieve(batch_id))
        except Exception as exc:
            raise classify(exc) from exc

    async def cancel(self, batch_id: str) -> BatchInfo:
        try:
            return _info(await self._client.batches.cancel(batch_id))
        except Exception as exc:
            raise classify(exc) from exc

    async def content(self, file_id: str) -> bytes:
        try:
            resp = await self._client.files.content(file_id)
        except Exception as exc:
            raise classify(exc) from exc
        return resp.content


__all__ = [
    "BUDGET_ERROR",
    "FINAL_STATES",
    "OPEN_STATES",
    "BatchClient",
    "BatchInfo",
    "CallDeferred",
    "LLMError",
    "LineResult",
    "ReplayLLM",
    "answer_of",
    "call_key",
    "endpoint_for",
    "parse_jsonl",
    "worst_usage",
    "write_jsonl",
]
