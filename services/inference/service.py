"""The inference use cases, free of HTTP: OpenAI requests in, OpenAI responses (or stream
chunks) out, over any ``Backend``."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from airoboros.contracts import AdapterPublished
from airoboros.inference.backend import (
    AdapterRejected,
    Backend,
    Chunk,
    Generation,
    GenerationRequest,
    InferenceError,
    InvalidRequest,
    ModelNotFound,
    Sampling,
    Unsupported,
)
from airoboros.inference.prompt import Turn, render_chat
from airoboros.inference.schemas import (
    AdapterLoadRequest,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    _Sampling,
)
from airoboros.inference.settings import InferenceSettings

log = logging.getLogger(__name__)

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def error_body(exc: InferenceError) -> dict[str, Any]:
    """OpenAI's error envelope."""
    kind = "invalid_request_error" if exc.status < 500 else "server_error"
    return {"error": {"message": str(exc), "type": kind, "param": exc.param, "code": exc.code}}


async def merge(gens: Sequence[Generation]) -> AsyncIterator[tuple[int, Chunk]]:
    """The chunks of several generations as they come, each with its position in ``gens``.
    Leaving early (or being cancelled) cancels the generations."""
    if len(gens) == 1:
        try:
            async for chunk in gens[0]:
                yield 0, chunk
        finally:
            gens[0].cancel()
        return
    queue: asyncio.Queue[tuple[int, Chunk | None]] = asyncio.Queue()

    async def pump(i: int, gen: Generation) -> None:
        try:
            async for chunk in gen:
                queue.put_nowait((i, chunk))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            else:
                yield i, item
    finally:
        for g in gens:
            g.cancel()
        for t in tasks:
            t.cancel()


def stream_chunk(
    kind: str,
    rid: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    include_usage: bool,
) -> dict[str, Any]:
    """One streamed event of a chat or text completion (``object`` is ``kind``); with
    ``include_usage``, ``usage`` is null until the last event, as OpenAI sends it."""
    body: dict[str, Any] = {
        "id": rid,
        "object": kind,
        "created": created,
        "model": model,
        "choices": choices,
        "system_fingerprint": None,
    }
    if include_usage:
        body["usage"] = None
    return body


class InferenceService:
    def __init__(self, backend: Backend, settings: InferenceSettings) -> None:
        self.backend = backend
        self.settings = settings
        self.created = int(time.time())

    # --- models and adapters ----------------------------------------------------------------

    def models(self) -> dict[str, Any]:
        base = self.backend.model_id
        data: list[dict[str, Any]] = [
            {
                "id": base,
                "object": "model",
                "created": self.created,
                "owned_by": "airoboros",
                "parent": None,
                "root": base,
            }
        ]
        for a in self.backend.adapters():
            data.append(
                {
                    "id": a.name,
                    "object": "model",
                    "created": a.created,
                    "owned_by": "airoboros",
                    "parent": base,
                    "root": base,
                    "description": a.description,
                }
            )
        return {"object": "list", "data": data}

    def adapters(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": a.name,
                    "object": "adapter",
                    "source": a.source,
                    "description": a.description,
                    "resident": a.resident,
                    "created": a.created,
                    "parent": self.backend.model_id,
                }
                for a in self.backend.adapters()
            ],
        }

    async def add_adapter(self, req: AdapterLoadRequest) -> dict[str, Any]:
        if (req.path is None) == (req.uri is None):
            raise AdapterRejected('give exactly one of "path" and "uri"', param="path")
        source = req.path if req.path is not None else req.uri
        assert source is not None
        info = await self.backend.load_adapter(req.name, source, replace=req.replace)
        return {
            "id": info.name,
            "object": "model",
            "parent": self.backend.model_id,
            "source": info.source,
            "description": info.description,
            "resident": info.resident,
            "created": info.created,
        }

    async def remove_adapter(self, name: str) -> dict[str, Any]:
        await self.backend.unload_adapter(name)
        return {"id": name, "object": "model", "deleted": True}

    async def on_adapter_published(self, msg: AdapterPublished) -> None:
        await self.backend.on_adapter_published(msg)

    # --- generation ---------------------------------------------------------------------------

    def _adapter_for(self, model: str) -> str | None:
        if model == self.backend.model_id:
            return None
        if self.backend.has_adapter(model):
            return model
        raise ModelNotFound(model)

    def _sampling(self, req: _Sampling) -> Sampling:
        if req.presence_penalty or req.frequency_penalty:
            raise Unsupported(
                "presence_penalty and frequency_penalty are not supported by this server "
                "(leave them out or 0)",
                param="presence_penalty" if req.presence_penalty else "frequency_penalty",
            )
        if req.logit_bias:
            raise Unsupported("logit_bias is not supported by this server", param="logit_bias")
        if req.n > self.settings.max_n:
            raise InvalidRequest(
                f"n is {req.n}; this server accepts at most {self.settings.max_n}", param="n"
            )
        top_k = req.top_k if req.top_k is not None and req.top_k > 0 else 0
        return Sampling(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=top_k,
            seed=req.seed,
        )

    @staticmethod
    def _turns(messages: list[ChatMessage]) -> list[Turn]:
        turns = []
        for i, m in enumerate(messages):
            role = ROLES.get(m.role)
            if role is None:
                raise InvalidRequest(
                    f"messages[{i}] has role '{m.role}'; this server accepts system, user "
                    "and assistant messages (no tools)",
                    param=f"messages[{i}].role",
                )
            if m.content is None:
                raise InvalidRequest(
                    f"messages[{i}] has no content", param=f"messages[{i}].content"
                )
            if isinstance(m.content, str):
                text = m.content
            else:
                parts = []
                for part in m.content:
                    if part.type != "text" or part.text is None:
                        raise Unsupported(
                            f"messages[{i}] has a '{part.type}' content part; only text is "
                            "supported",
                            param=f"messages[{i}].content",
                        )
                    parts.append(part.text)
                text = "".join(parts)
            turns.append(Turn(role, text))  # type: ignore[arg-type]
        return turns

    async def chat(self, req: ChatCompletionRequest) -> dict[str, Any] | AsyncIterator[str]:
        """A ``chat.completion`` body, or (``stream``) an iterator of SSE ``data:`` lines."""
        if req.logprobs:
            raise Unsupported("logprobs are not supported by this server", param="logprobs")
        if req.tools:
            raise Unsupported("tools are not supported by this server", param="tools")
        fmt = (req.response_format or {}).get("type", "text")
        if fmt != "text":
            raise Unsupported(
                f"response_format {fmt!r} is not supported (only 'text')", param="response_format"
            )
        adapter = self._adapter_for(req.model)
        max_tokens = req.max_completion_tokens or req.max_tokens
        sampling = self._sampling(req)
        prompt, add_bos = render_chat(
            self._turns(req.messages), self.backend.tokenizer, self.settings.prompt_format
        )
        gens = await self.backend.submit(
            GenerationRequest(
                adapter=adapter,
                prompt=prompt,
                add_bos=add_bos,
                max_tokens=max_tokens,
                sampling=sampling,
                stop=req.stop_list(),
                n=req.n,
                stream=req.stream,
            )
        )
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._chat_stream(rid, created, req.model, gens, include_usage)
        texts, reasons = await self._collect(gens)
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": req.model,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": texts[i]},
                    "finish_reason": reasons[i],
                    "logprobs": None,
                }
                for i in range(len(gens))
            ],
            "usage": self._usage(gens[0].prompt_tokens, gens),
            "system_fingerprint": None,
        }

    async def completion(self, req: CompletionRequest) -> dict[str, Any] | AsyncIterator[str]:
        if req.logprobs is not None:
            raise Unsupported("logprobs are not supported by this server", param="logprobs")
        if req.suffix:
            raise Unsupported("suffix is not supported by this server", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise Unsupported("best_of (other than n) is not supported", param="best_of")
        adapter = self._adapter_for(req.model)
        sampling = self._sampling(req)
        prompts: list[str | list[int]]
        p = req.prompt
        if isinstance(p, str):
            prompts = [p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [[x for x in p if isinstance(x, int)]]
        else:
            prompts = [x for x in p if isinstance(x, str | list)]
        if not prompts:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        if len(prompts) * req.n > self.settings.max_n:
            raise InvalidRequest(
                f"{len(prompts)} prompts x n={req.n} choices exceed this server's "
                f"limit of {self.settings.max_n}",
                param="prompt",
            )
        gens: list[Generation] = []
        prompt_tokens = 0
        try:
            for one in prompts:
                got = await self.backend.submit(
                    GenerationRequest(
                        adapter=adapter,
                        prompt=one,
                        max_tokens=req.max_tokens,
                        sampling=sampling,
                        stop=req.stop_list(),
                        n=req.n,
                        stream=req.stream,
                    )
                )
                gens.extend(got)
                prompt_tokens += got[0].prompt_tokens
        except BaseException:
            for g in gens:
                g.cancel()
            raise
        echoes: list[str] = []
        for i in range(len(gens)):
            one = prompts[i // req.n]
            echoes.append(one if req.echo and isinstance(one, str) else "")
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._completion_stream(
                rid, created, req.model, gens, prompt_tokens, include_usage, echoes
            )
        texts, reasons = await self._collect(gens)
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": req.model,
            "choices": [
                {
                    "index": i,
                    "text": echoes[i] + texts[i],
                    "finish_reason": reasons[i],
                    "logprobs": None,
                }
                for i in range(len(gens))
            ],
            "usage": self._usage(prompt_tokens, gens),
            "system_fingerprint": None,
        }

    # --- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _usage(prompt_tokens: int, gens: Sequence[Generation]) -> dict[str, int]:
        completion = sum(g.completion_tokens for g in gens)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }

    @staticmethod
    async def _collect(gens: Sequence[Generation]) -> tuple[list[str], list[str | None]]:
        texts = [""] * len(gens)
        reasons: list[str | None] = [None] * len(gens)
        async for i, chunk in merge(gens):
            if chunk.error is not None:
                raise chunk.error
            texts[i] += chunk.text
            if chunk.finish_reason is not None:
                reasons[i] = chunk.finish_reason
        return texts, reasons

    @staticmethod
    def _sse(payload: dict[str, Any]) -> str:
        import json

        return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"

    async def _chat_stream(
        self,
        rid: str,
        created: int,
        model: str,
        gens: list[Generation],
        include_usage: bool,
    ) -> AsyncIterator[str]:
        def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
            return stream_chunk(
                "chat.completion.chunk", rid, created, model, choices, include_usage
            )

        def choice(i: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}

        try:
            for i in range(len(gens)):
                yield self._sse(chunk([choice(i, {"role": "assistant", "content": ""})]))
            async for i, c in merge(gens):
                if c.error is not None:
                    yield self._sse(error_body(c.error))
                    return
                if c.text:
                    yield self._sse(chunk([choice(i, {"content": c.text})]))
                if c.finish_reason is not None:
                    yield self._sse(chunk([choice(i, {}, c.finish_reason)]))
            if include_usage:
                final = chunk([])
                final["usage"] = self._usage(gens[0].prompt_tokens, gens)
                yield self._sse(final)
            yield "data: [DONE]\n\n"
        finally:
            for g in gens:
                g.cancel()

    async def _completion_stream(
        self,
        rid: str,
        created: int,
        model: str,
        gens: list[Generation],
        prompt_tokens: int,
        include_usage: bool,
        echoes: list[str],
    ) -> AsyncIterator[str]:
        def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
            return stream_chunk("text_completion", rid, created, model, choices, include_usage)

        def choice(i: int, text: str, finish: str | None = None) -> dict[str, Any]:
            return {"index": i, "text": text, "finish_reason": finish, "logprobs": None}

        try:
            for i, echo in enumerate(echoes):
                if echo:
                    yield self._sse(chunk([choice(i, echo)]))
            async for i, c in merge(gens):
                if c.error is not None:
                    yield self._sse(error_body(c.error))
                    return
                if c.text or c.finish_reason is not None:
                    yield self._sse(chunk([choice(i, c.text, c.finish_reason)]))
            if include_usage:
                final = chunk([])
                final["usage"] = self._usage(prompt_tokens, gens)
                yield self._sse(final)
            yield "data: [DONE]\n\n"
        finally:
            for g in gens:
                g.cancel()
