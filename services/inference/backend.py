"""What the OpenAI front end needs from a generation backend.

Its errors are the tree's (``airoboros.errors``: ``InvalidRequest``,
``ContextLengthExceeded``, ``Unsupported``, ``UnknownModel``, ``AdapterRejected``,
``AdapterConflict``, ``AdapterUnavailable``, ``Overloaded``, ``BackendFailure``), each
with the HTTP status and code the API answers with.

Two backends implement ``GenerationBackend``: ``airoboros.inference.engine.LocalEngine`` (the base
model and its adapters in this process, with a continuous-batching scheduler) and
``airoboros.inference.tgi.TGIBackend`` (a text-generation-inference server).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from airoboros.contracts import AdapterPublished
from airoboros.errors import ApiError, UnknownModel
from airoboros.inference.constrained import FormatSpec

FinishReason = Literal["stop", "length"]


# --- errors (the tree's: airoboros.errors) -------------------------------------------------


def unknown_model(model: str) -> UnknownModel:
    """The 404 for a ``model`` that is neither the base model nor a registered adapter."""
    return UnknownModel(
        f"The model '{model}' does not exist: GET /v1/models lists the base model and "
        "the adapters served here",
        param="model",
    )


# --- requests and results ----------------------------------------------------------------


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. ``temperature == 0`` is greedy; ``top_k == 0`` disables it."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    #: with a seed, choice ``i`` samples from a generator seeded with ``seed + i``: the same
    #: request gives the same output alone or batched with others
    seed: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    #: an adapter name, or None for the base model
    adapter: str | None
    #: prompt text, or token ids (the local engine only)
    prompt: str | list[int]
    #: put the tokenizer's BOS in front of a text prompt (as the trainer did)
    add_bos: bool = True
    #: requested completion length; None: as much as the context and the cap allow
    max_tokens: int | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    #: the text is cut before the first occurrence of any of these; finish_reason "stop"
    stop: tuple[str, ...] = ()
    n: int = 1
    #: whether the client streams (a hint: TGI then uses /generate_stream)
    stream: bool = True
    #: the output must be JSON of this shape (``response_format``); None: free text
    response_format: FormatSpec | None = None


@dataclass(frozen=True)
class Chunk:
    """A piece of one choice's output. The last one has ``finish_reason`` set."""

    text: str
    finish_reason: FinishReason | None = None
    #: tokens generated so far for this choice (EOS included when it ended the choice)
    completion_tokens: int = 0
    #: set when generation failed; the stream ends after this chunk
    error: ApiError | None = None


class ChoiceStream:
    """One choice being generated: iterate it for ``Chunk``s; ``cancel()`` when the client
    goes away. Backends push chunks with ``put`` from the event loop's thread."""

    def __init__(self, prompt_tokens: int, index: int = 0) -> None:
        self.prompt_tokens = prompt_tokens
        self.index = index
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None
        self.cancelled = False
        self._queue: asyncio.Queue[Chunk] = asyncio.Queue()
        self._done = False

    def put(self, chunk: Chunk) -> None:
        if self._done:
            return
        self.completion_tokens = max(self.completion_tokens, chunk.completion_tokens)
        if chunk.finish_reason is not None or chunk.error is not None:
            self.finish_reason = chunk.finish_reason
            self._done = True
        self._queue.put_nowait(chunk)

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self._done

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        while True:
            chunk = await self._queue.get()
            yield chunk
            if chunk.finish_reason is not None or chunk.error is not None:
                return


@dataclass(frozen=True)
class ServedAdapter:
    """An adapter a backend serves: where it comes from, and whether it is in memory."""

    name: str
    source: str
    description: str = ""
    resident: bool = False
    created: int = 0


class GenerationBackend(Protocol):
    """A generation backend behind the OpenAI API.

    ``submit`` validates the request (model, context length) before anything is generated
    and raises an ``ApiError`` for a bad one, so that the HTTP edge can answer with a
    status code even for streamed requests; it returns one ``ChoiceStream`` per choice.
    """

    @property
    def model_id(self) -> str: ...

    @property
    def tokenizer(self) -> Any | None:
        """The base model's tokenizer (chat template), or None when there is none here."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def ready(self) -> bool: ...

    def adapters(self) -> list[ServedAdapter]: ...

    def has_adapter(self, name: str) -> bool: ...

    async def submit(self, request: GenerationRequest) -> list[ChoiceStream]: ...

    async def load_adapter(self, name: str, source: str, *, replace: bool = False) -> ServedAdapter:
        """Register adapter ``name`` from ``source`` (a path or file:// / s3:// URI) and load
        it if a slot is free. Raises ``AdapterRejected`` (bad name, path outside the roots,
        not safetensors), ``AdapterConflict`` (the name is taken and not ``replace``)."""
        ...

    async def unload_adapter(self, name: str) -> None:
        """Forget adapter ``name``; running sequences finish, waiting ones fail."""
        ...

    async def on_adapter_published(self, msg: AdapterPublished) -> None:
        """Bus hook: load (or replace) the announced expert."""
        ...
