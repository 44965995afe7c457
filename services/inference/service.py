"""The inference use cases, free of HTTP: OpenAI requests in, OpenAI responses (or stream
chunks) out (``airoboros.protocol``), over any ``GenerationBackend``."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence

from airoboros.contracts import AdapterPublished
from airoboros.errors import AdapterRejected, InvalidRequest, Unsupported
from airoboros.inference.backend import (
    ChoiceStream,
    Chunk,
    FinishReason,
    GenerationBackend,
    GenerationRequest,
    SamplingParams,
    unknown_model,
)
from airoboros.inference.constrained import parse_response_format
from airoboros.inference.prompt import PromptTurn, render_chat
from airoboros.inference.settings import InferenceSettings
from airoboros.protocol import (
    AdapterCard,
    AdapterList,
    AdapterLoadRequest,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    ChoiceDelta,
    CompletionParams,
    CompletionRequest,
    DeletedModel,
    ModelCard,
    ModelList,
    TextChoice,
    TextCompletion,
    TokenUsage,
    error_event,
    stream_event,
)
from airoboros.web import error_envelope

log = logging.getLogger(__name__)

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


async def merge(gens: Sequence[ChoiceStream]) -> AsyncIterator[tuple[int, Chunk]]:
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

    async def pump(i: int, gen: ChoiceStream) -> None:
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


class InferenceService:
    def __init__(self, backend: GenerationBackend, settings: InferenceSettings) -> None:
        self.backend = backend
        self.settings = settings
        self.created = int(time.time())

    # --- models and adapters ----------------------------------------------------------------

    def models(self) -> ModelList:
        """The base model, then every registered adapter (``parent``: the base model)."""
        base = self.backend.model_id
        data = [
            ModelCard(id=base, created=self.created, owned_by="airoboros", parent=None, root=base)
        ]
        for a in self.backend.adapters():
            data.append(
                ModelCard(
                    id=a.name,
                    created=a.created,
                    owned_by="airoboros",
                    parent=base,
                    root=base,
                    description=a.description,
                )
            )
        return ModelList(data=data)

    def model(self, model_id: str) -> ModelCard:
        for m in self.models().data:
            if m.id == model_id:
                return m
        raise unknown_model(model_id)

    def adapters(self) -> AdapterList:
        return AdapterList(
            data=[
                AdapterCard(
                    id=a.name,
                    source=a.source,
                    description=a.description,
                    resident=a.resident,
                    created=a.created,
                    parent=self.backend.model_id,
                )
                for a in self.backend.adapters()
            ]
        )

    async def add_adapter(self, req: AdapterLoadRequest) -> AdapterCard:
        if (req.path is None) == (req.uri is None):
            raise AdapterRejected('give exactly one of "path" and "uri"', param="path")
        source = req.path if req.path is not None else req.uri
        assert source is not None
        info = await self.backend.load_adapter(req.name, source, replace=req.replace)
        return AdapterCard(
            id=info.name,
            object="model",
            parent=self.backend.model_id,
            source=info.source,
            description=info.description,
            resident=info.resident,
            created=info.created,
        )

    async def remove_adapter(self, name: str) -> DeletedModel:
        await self.backend.unload_adapter(name)
        return DeletedModel(id=name)

    async def on_adapter_published(self, msg: AdapterPublished) -> None:
        await self.backend.on_adapter_published(msg)

    # --- generation ---------------------------------------------------------------------------

    def _adapter_for(self, model: str | None) -> str | None:
        if model is None:
            # Only the router chooses a model for the client; this server needs one.
            raise InvalidRequest("model: Field required", param="model")
        if model == self.backend.model_id:
            return None
        if self.backend.has_adapter(model):
            return model
        raise unknown_model(model)

    def _sampling(self, req: CompletionParams) -> SamplingParams:
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
        return SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=top_k,
            seed=req.seed,
        )

    @staticmethod
    def _turns(messages: list[ChatMessage]) -> list[PromptTurn]:
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
            turns.append(PromptTurn(role, text))  # type: ignore[arg-type]
        return turns

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletion | AsyncIterator[str]:
        """A ``chat.completion``, or (``stream``) an iterator of SSE ``data:`` lines."""
        if req.logprobs:
            raise Unsupported("logprobs are not supported by this server", param="logprobs")
        if req.tools:
            raise Unsupported("tools are not supported by this server", param="tools")
        response_format = parse_response_format(req.response_format)
        adapter = self._adapter_for(req.model)
        assert req.model is not None
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
                stream=bool(req.stream),
                response_format=response_format,
            )
        )
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if req.stream:
            return self._chat_stream(rid, created, req.model, gens, req.include_usage)
        texts, reasons = await self._collect(gens)
        return ChatCompletion(
            id=rid,
            created=created,
            model=req.model,
            choices=[
                ChatChoice(
                    index=i,
                    message=AssistantMessage(content=texts[i]),
                    finish_reason=reasons[i],
                )
                for i in range(len(gens))
            ],
            usage=self._usage(gens[0].prompt_tokens, gens),
        )

    async def completion(self, req: CompletionRequest) -> TextCompletion | AsyncIterator[str]:
        """A ``text_completion``, or (``stream``) an iterator of SSE ``data:`` lines."""
        if req.logprobs is not None:
            raise Unsupported("logprobs are not supported by this server", param="logprobs")
        if req.suffix:
            raise Unsupported("suffix is not supported by this server", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise Unsupported("best_of (other than n) is not supported", param="best_of")
        if (req.model_extra or {}).get("response_format") not in (None, {"type": "text"}):
            raise Unsupported(
                "response_format is supported on /v1/chat/completions only",
                param="response_format",
            )
        adapter = self._adapter_for(req.model)
        assert req.model is not None
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
        gens: list[ChoiceStream] = []
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
                        stream=bool(req.stream),
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
            return self._completion_stream(
                rid, created, req.model, gens, prompt_tokens, req.include_usage, echoes
            )
        texts, reasons = await self._collect(gens)
        return TextCompletion(
            id=rid,
            created=created,
            model=req.model,
            choices=[
                TextChoice(index=i, text=echoes[i] + texts[i], finish_reason=reasons[i])
                for i in range(len(gens))
            ],
            usage=self._usage(prompt_tokens, gens),
        )

    # --- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _usage(prompt_tokens: int, gens: Sequence[ChoiceStream]) -> TokenUsage:
        completion = sum(g.completion_tokens for g in gens)
        return TokenUsage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion,
            total_tokens=prompt_tokens + completion,
        )

    @staticmethod
    async def _collect(
        gens: Sequence[ChoiceStream],
    ) -> tuple[list[str], list[FinishReason | None]]:
        texts = [""] * len(gens)
        reasons: list[FinishReason | None] = [None] * len(gens)
        async for i, chunk in merge(gens):
            if chunk.error is not None:
                raise chunk.error
            texts[i] += chunk.text
            if chunk.finish_reason is not None:
                reasons[i] = chunk.finish_reason
        return texts, reasons

    async def _chat_stream(
        self,
        rid: str,
        created: int,
        model: str,
        gens: list[ChoiceStream],
        include_usage: bool,
    ) -> AsyncIterator[str]:
        def event(*choices: ChatChunkChoice, usage: TokenUsage | None = None) -> str:
            chunk = ChatCompletionChunk(
                id=rid, created=created, model=model, choices=list(choices), usage=usage
            )
            return stream_event(chunk, include_usage)

        try:
            for i in range(len(gens)):
                first = ChoiceDelta(role="assistant", content="")
                yield event(ChatChunkChoice(index=i, delta=first))
            async for i, c in merge(gens):
                if c.error is not None:
                    yield error_event(error_envelope(c.error))
                    return
                if c.text:
                    yield event(ChatChunkChoice(index=i, delta=ChoiceDelta(content=c.text)))
                if c.finish_reason is not None:
                    done = ChatChunkChoice(
                        index=i, delta=ChoiceDelta(), finish_reason=c.finish_reason
                    )
                    yield event(done)
            if include_usage:
                yield event(usage=self._usage(gens[0].prompt_tokens, gens))
            yield "data: [DONE]\n\n"
        finally:
            for g in gens:
                g.cancel()

    async def _completion_stream(
        self,
        rid: str,
        created: int,
        model: str,
        gens: list[ChoiceStream],
        prompt_tokens: int,
        include_usage: bool,
        echoes: list[str],
    ) -> AsyncIterator[str]:
        def event(*choices: TextChoice, usage: TokenUsage | None = None) -> str:
            chunk = TextCompletion(
                id=rid, created=created, model=model, choices=list(choices), usage=usage
            )
            return stream_event(chunk, include_usage)

        try:
            for i, echo in enumerate(echoes):
                if echo:
                    yield event(TextChoice(index=i, text=echo))
            async for i, c in merge(gens):
                if c.error is not None:
                    yield error_event(error_envelope(c.error))
                    return
                if c.text or c.finish_reason is not None:
                    yield event(TextChoice(index=i, text=c.text, finish_reason=c.finish_reason))
            if include_usage:
                yield event(usage=self._usage(prompt_tokens, gens))
            yield "data: [DONE]\n\n"
        finally:
            for g in gens:
                g.cancel()
