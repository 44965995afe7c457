"""The bodies of the HTTP APIs, one definition each: OpenAI's chat and text completions
(requests, answers, stream chunks, model lists), the inference service's adapters, the
topics API's jobs, rows, uploads and topics, and the one error envelope.

The router and the inference service parse requests with the same models: a request the
router lets through is one an inference pod can parse. Request models allow fields they
do not name (OpenAI's newer ones; the router passes every field on untouched), answer
models likewise (a backend may say more than OpenAI's minimum).

Who decides what: these models hold the shapes and the bounds of single fields. What
depends on a server (the inference service's ``max_n``, which model names exist, the
order of chat roles) is checked by that server, with its own messages.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
)

# --- the error envelope ------------------------------------------------------------------


class ErrorDetail(BaseModel):
    """OpenAI's error object. The topics API adds fields (``problems``: every problem of
    a config, each naming its key)."""

    model_config = ConfigDict(extra="allow")
    message: str
    #: ``invalid_request_error`` (4xx), ``server_error`` (5xx), ``requests`` (rate limit)
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(BaseModel):
    """Every error answer of every API: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


def error_body(
    message: str,
    type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    **details: Any,
) -> dict[str, Any]:
    """An ``ErrorEnvelope`` as plain data (what goes in a JSON answer or an SSE event)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code, **details}}


#: ``responses`` of a route whose errors are the envelope (an OpenAPI ``default``)
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "default": {"model": ErrorEnvelope, "description": "An error, in OpenAI's envelope."}
}


def completion_responses(answer: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """``responses`` of a completions route: JSON (``answer``), or with ``stream: true``
    server-sent events, each one's data a JSON chunk, the last ``[DONE]`` (``itemSchema``:
    one event, as OpenAPI 3.2 has it); errors in the envelope."""
    return {
        200: {
            "model": answer,
            "description": "The completion; with ``stream``, its chunks as server-sent events.",
            "content": {
                "text/event-stream": {
                    "itemSchema": {
                        "type": "object",
                        "required": ["data"],
                        "properties": {"data": {"type": "string"}},
                    }
                }
            },
        },
        **ERROR_RESPONSES,
    }


def has_lone_surrogate(raw: bytes, data: Any) -> bool:
    """Whether ``data`` (parsed from ``raw`` by ``json.loads``) holds a string that is no
    Unicode text: a lone surrogate, escaped (``\\ud800``) or as raw bytes, which
    ``json.loads`` lets through and neither a tokenizer nor a backend can take. (Pydantic's
    own JSON parser refuses them.)"""
    if raw.isascii() and b"\\u" not in raw:
        return False  # no escape and no byte beyond ASCII: nothing can be a surrogate
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# --- OpenAI requests: chat and text completions -------------------------------------------

#: the largest ``top_k`` accepted (the backends take a 32-bit integer)
MAX_TOP_K = 2**31 - 1
#: the most stop sequences a request may give
MAX_STOPS = 16
#: what the router reads as "choose the expert for me"
AUTO = "auto"

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    #: a last chunk with ``choices: []`` carries the usage (every chunk has ``usage: null``)
    include_usage: bool = False


class ContentPart(BaseModel):
    """One part of a message's content (``{"type": "text", "text": ...}``; images and
    others are parsed, and refused by servers that cannot take them)."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None


class CompletionParams(BaseModel):
    """What chat and text completions share."""

    model_config = ConfigDict(extra="allow")

    #: an expert, an adapter or the base model; absent or ``"auto"``: the router chooses
    #: (the original LMoE server's clients may leave it out); the inference service
    #: needs one
    model: str | None = Field(default=None, min_length=1)
    #: the original LMoE server's extension: the expert to answer (the router's)
    expert: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    #: not OpenAI's (vLLM's and TGI's): None, 0 or -1 disable it; one beyond the vocabulary
    #: keeps every token
    top_k: int | None = Field(default=None, ge=-1, le=MAX_TOP_K)
    #: choice ``i`` samples from a generator seeded ``seed + i``
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list):
            if len(v) > MAX_STOPS:
                raise ValueError(f"at most {MAX_STOPS} stop sequences")
            if any(not s for s in v):
                raise ValueError("stop sequences must not be empty")
        return v

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        if isinstance(self.stop, str):
            return (self.stop,) if self.stop else ()
        return tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(CompletionParams):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    #: OpenAI's newer name for ``max_tokens`` (wins when both are given)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


#: a text prompt, several, token ids, or several lists of token ids
Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(CompletionParams):
    """``POST /v1/completions``."""

    prompt: Prompt
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


# --- OpenAI answers ---------------------------------------------------------------------

FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


class TokenUsage(BaseModel):
    model_config = ConfigDict(extra="allow")
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    model_config = ConfigDict(extra="allow")
    index: int
    message: AssistantMessage
    finish_reason: FinishReason | None = None
    logprobs: Any = None


class ChatCompletion(BaseModel):
    """A chat completion answered whole."""

    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: TokenUsage | None = None
    system_fingerprint: str | None = None


class ChoiceDelta(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["assistant"] | None = Field(default=None, exclude_if=lambda v: v is None)
    content: str | None = Field(default=None, exclude_if=lambda v: v is None)


class ChatChunkChoice(BaseModel):
    model_config = ConfigDict(extra="allow")
    index: int
    delta: ChoiceDelta
    finish_reason: FinishReason | None = None
    logprobs: Any = None


class ChatCompletionChunk(BaseModel):
    """One event of a streamed chat completion. With ``include_usage`` every chunk has
    ``usage: null`` and a last one with ``choices: []`` carries it; without, there is no
    ``usage`` key (``stream_event`` leaves it out)."""

    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    system_fingerprint: str | None = None
    usage: TokenUsage | None = None


class TextChoice(BaseModel):
    model_config = ConfigDict(extra="allow")
    index: int
    text: str
    finish_reason: FinishReason | None = None
    logprobs: Any = None


class TextCompletion(BaseModel):
    """A text completion answered whole, and (the same shape, as OpenAI streams it) each
    event of a streamed one."""

    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: TokenUsage | None = None
    system_fingerprint: str | None = None


def stream_event(chunk: ChatCompletionChunk | TextCompletion, include_usage: bool) -> str:
    """One server-sent event (``data: {...}``): compact JSON, text as UTF-8; ``usage``
    only when the client asked for it (``stream_options.include_usage``)."""
    exclude = None if include_usage else {"usage"}
    return f"data: {chunk.model_dump_json(exclude=exclude)}\n\n"


def error_event(body: dict[str, Any]) -> str:
    """An error in the middle of a stream: OpenAI's SDK raises it as ``APIError``."""
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


class RoutedChatCompletion(ChatCompletion):
    """The router's answer: the backend's, with the expert that answered."""

    expert: str


class RoutedTextCompletion(TextCompletion):
    expert: str


# --- models and adapters ------------------------------------------------------------------


class ModelCard(BaseModel):
    """A model a server answers for: an expert (adapter), the base model, ``auto``.
    ``parent``, ``root`` and ``description`` are in the answer only when given (the
    inference service's base model has ``parent: null``; the router's cards have none)."""

    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    #: the base model's id, for an adapter (inference)
    parent: str | None = None
    root: str | None = None
    #: what the expert is for (its description.txt)
    description: str | None = None

    # No return annotation: with one, pydantic would describe the answer by it (``Any``: no
    # schema at all) instead of by the fields.
    @model_serializer(mode="wrap")
    def _given_only(self, handler: SerializerFunctionWrapHandler):  # type: ignore[no-untyped-def]
        data = handler(self)
        if isinstance(data, dict):
            for key in ("parent", "root", "description"):
                if key not in self.model_fields_set:
                    data.pop(key, None)
        return data


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AdapterLoadRequest(BaseModel):
    """``POST /v1/adapters``: give ``path`` (a local folder under the adapter roots) or
    ``uri`` (file:// or s3://)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    path: str | None = None
    uri: str | None = None
    #: replace an adapter of the same name (its running requests finish on the old one)
    replace: bool = False


class AdapterCard(BaseModel):
    """An adapter the inference service serves (``GET /v1/adapters``; ``object`` is
    ``model`` in the answer to loading one)."""

    id: str
    object: Literal["adapter", "model"] = "adapter"
    parent: str
    source: str
    description: str
    #: whether its weights are in memory now (others load on first use)
    resident: bool
    created: int


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterCard]


class DeletedModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


# --- the topics API -----------------------------------------------------------------------


class ConfigDocument(BaseModel):
    """An airoboros config (example-config.yaml), as JSON or YAML. Read by the server's
    policy and validated as ``airoboros.config.Config``, every problem at once (422)."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "model": "gpt-4o-mini",
                    "topics": ["astronomy", "gardening"],
                    "instructors": {"joke": {"count": 2}},
                }
            ]
        },
    )


class TopicsRequest(ConfigDocument):
    """``POST /v1/topics:generate``: a config whose topic keys say how to ask for topics."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "model": "gpt-4o-mini",
                    "topic_prompt": "Give me a numbered list of 20 completely random topics.",
                    "topic_request_count": 1,
                }
            ]
        },
    )


class TopicsGenerated(BaseModel):
    topics: list[str]
    count: int


class CullRequest(BaseModel):
    """Body of ``POST /v1/jobs/{id}/cull`` (all optional)."""

    model_config = ConfigDict(extra="forbid")
    #: the judge keeps rows scoring at least this (0-100); default: the job's config
    threshold: int | None = Field(default=None, ge=0, le=100)


class InstructorStatus(BaseModel):
    """One instructor (category) of a job: its count, and where its calls went."""

    model_config = ConfigDict(extra="allow")
    accepted: int
    target: int
    duplicates: int
    filtered: int
    refused: int
    unparseable: int
    truncated: int
    failures: int
    #: rows past the count, not kept
    dropped: int
    #: accepted candidates not answered for want of room in the count
    withheld: int
    retries: int
    in_flight: int
    #: room in the count held by screened batches in flight
    reserved: int
    prompt_tokens: int
    completion_tokens: int
    cost: float
    wasted_tokens: int
    #: why the category stopped short of its count (null while it can progress)
    stopped: str | None = None
    #: why it has nothing to do (not a failure)
    skipped: str | None = None


class TokenTotals(BaseModel):
    prompt: int
    completion: int


class DeadLetterInfo(BaseModel):
    """A message of the job's pipeline that kept failing (kept for an operator)."""

    model_config = ConfigDict(extra="allow")
    queue: str
    message_id: str | None = None
    kind: str | None = None
    #: why the bus gave up on it (an unknown schema MAJOR, not its type, the delivery limit)
    reason: str | None = None
    created_at: str


class TrainedExpert(BaseModel):
    """An expert the trainer made from the job's dataset."""

    model_config = ConfigDict(extra="allow")
    expert: str
    version: str
    status: str
    uri: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    detail: str | None = None


class JobStatus(BaseModel):
    """``GET /v1/jobs/{id}`` (and the answer of every call that changes a job)."""

    model_config = ConfigDict(extra="allow")
    id: str
    status: str
    detail: str | None = None
    created_at: str
    finished_at: str | None = None
    cancel_requested: bool = False
    instructors: dict[str, InstructorStatus]
    #: rows of the dataset (what an export holds): rows marked bad are left out
    rows: int
    #: rows marked bad (kept in the store, listed by /items, left out of exports)
    bad_rows: int = 0
    tokens: TokenTotals
    cost: float
    dead_letters: list[DeadLetterInfo] = Field(default_factory=list)
    #: the exported dataset's URI, once written
    export: str | None = None
    export_pending: bool = False
    export_error: str | None = None
    experts: list[TrainedExpert] = Field(default_factory=list)
    #: (batch lane, docs/batch.md) per instructor, its batch jobs by state
    batches: dict[str, dict[str, int]] = Field(default_factory=dict)


class JobCreated(JobStatus):
    """``POST /v1/jobs``: the new job's status, what the config asks that is not generated,
    and what the server changed or ignored."""

    #: category: why it is not generated
    skipped: dict[str, str] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)


class CullCreated(JobStatus):
    """``POST /v1/jobs/{id}/cull``: the cull job's status, and the job it culls."""

    cull_of: str


class JobSummary(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    status: str
    created_at: str


class JobList(BaseModel):
    data: list[JobSummary]


class ItemRow(BaseModel):
    """A dataset row as the original tool writes it, with its sequence number."""

    model_config = ConfigDict(extra="allow")
    seq: int
    instruction: str
    response: str
    category: str
    system: str | None = Field(default=None, exclude_if=lambda v: v is None)
    skip_prompt_formatting: bool | None = Field(default=None, exclude_if=lambda v: v is None)
    #: marked bad (``POST /v1/jobs/{id}/items/{seq}/bad``): left out of every export and
    #: cull, kept in the store and listed here so that it can be unmarked
    bad: bool = False


class ItemsPage(BaseModel):
    items: list[ItemRow]
    #: pass as ``after`` for the next page; null: this was the last
    next_after: int | None = None


class BadMark(BaseModel):
    """Body of ``POST /v1/jobs/{id}/items/{seq}/bad``: mark the row bad, or good again."""

    model_config = ConfigDict(extra="forbid")
    bad: bool = Field(strict=True)


# --- experts and pods (the console; GET /v1/experts on topics, GET /v1/pods on the router) --


class ExpertVersion(BaseModel):
    """One trained version of an expert, from the trainer's adapter registry."""

    model_config = ConfigDict(extra="allow")
    expert: str
    version: str
    base_model: str
    #: training | published | failed
    status: str
    job_id: str | None = None
    dataset_uri: str | None = None
    uri: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    #: why training failed (or what it noted)
    detail: str | None = None
    created_at: str


class PodStatus(BaseModel):
    """One inference backend of the router, as the router sees it now."""

    model_config = ConfigDict(extra="allow")
    #: its API base (``http://pod:8000/v1``)
    url: str
    healthy: bool
    #: requests in flight through this router
    outstanding: int
    #: the adapters it lists in its ``GET /v1/models`` (or answered for); the base models
    #: it names are in ``models``
    adapters: list[str] = Field(default_factory=list)
    #: every model id it lists; null: unknown (a server without ``/v1/models``)
    models: list[str] | None = None
    #: why its last health check failed
    error: str | None = None


class PodList(BaseModel):
    """``GET /v1/pods`` on the router."""

    object: Literal["list"] = "list"
    data: list[PodStatus]


class ExpertsPage(BaseModel):
    """``GET /v1/experts`` on topics: the registered versions the caller may see, and the
    router's pods (empty, with ``router: null``, when no router is configured)."""

    data: list[ExpertVersion]
    pods: list[PodStatus] = Field(default_factory=list)
    #: the router the topics service is configured with (AIROBOROS_ROUTER_URL); null: none
    router: str | None = None
    #: why the pods could not be listed (the router is down, refused the key, ...)
    pods_error: str | None = None


class UploadedFile(BaseModel):
    name: str
    bytes: int


class DocumentsUploaded(BaseModel):
    """``POST /v1/documents``: name the upload in a job by ``id``
    (``instructors.documents.documents_upload``)."""

    id: str
    files: list[UploadedFile]
    #: passages found in the files (what the documents instructor works from)
    passages: int


# --- the quality report of a job (GET /v1/jobs/{id}/report; docs/report.md) ----------------


class Diversity(BaseModel):
    """How varied a set of kept instructions is (airoboros.report). Each figure is null
    when there is too little to measure (no instruction, or fewer than two vectors)."""

    model_config = ConfigDict(extra="allow")
    #: instructions measured (all of them, or a random sample of a large category)
    instructions: int
    #: distinct word unigrams / all unigrams of those instructions (1: no word repeats)
    distinct_1: float | None = None
    #: distinct word bigrams / all bigrams (low: the same phrasings again and again)
    distinct_2: float | None = None
    #: bytes of the instructions / bytes zlib-compressed (high: repetitive; it grows with
    #: the amount of text, so compare sets of similar size)
    compression_ratio: float | None = None
    #: mean cosine of each instruction's nearest other instruction, by the embeddings
    #: dedupe stored (high: near-duplicates below the dedupe threshold)
    nn_cosine: float | None = None
    #: what ``nn_cosine`` was measured on: "category" (the category's own vectors), "job"
    #: (the whole job index: the totals, or a category with fewer than two vectors of its
    #: own there) or null (not screened by dedupe)
    nn_scope: str | None = None
    #: vectors of that index used as queries (a random sample of a large index)
    nn_sampled: int = 0


class Funnel(BaseModel):
    """Where a category's (or the job's) items went, what they cost, how varied what was
    kept is: the fields a category and the job's totals share."""

    model_config = ConfigDict(extra="allow")
    target: int
    #: candidates step 1 proposed (usable items after the per-item checks; what dedupe
    #: screened)
    proposed: int
    #: replies in which no item could be parsed
    unparseable: int
    #: items dropped by response_filters or the instructor's checks (either step)
    filtered: int
    #: items, or whole answers, that were refusals
    refused: int
    #: candidates too similar to what the dataset held
    duplicates: int
    #: accepted candidates not answered for want of room in the count
    withheld: int
    #: rows made past the count, not kept
    dropped: int
    #: rows (and character cards) counted toward the target
    kept: int
    #: rows of the category in the dataset (an rp chat is one kept unit over several rows)
    rows: int
    #: kept / (kept + duplicates); null before any candidate was screened
    dedupe_yield: float | None = None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: float
    #: cost / kept; null while nothing is kept
    cost_per_kept: float | None = None
    #: tokens of calls that bought no kept row (airoboros.counting.CategoryCounts.apply)
    wasted_tokens: int
    #: cost_per_kept times the rows still missing (null while nothing is kept)
    cost_to_finish: float | None = None
    diversity: Diversity


class CategoryReport(Funnel):
    """One category (instructor) of a job."""

    category: str


class ReportTotals(Funnel):
    """The job's totals over every category (usage outside batches included)."""


class JobReport(BaseModel):
    """``GET /v1/jobs/{id}/report``, and ``<output>.report.json`` beside an embedded run's
    output: the quality report of a job (docs/report.md)."""

    model_config = ConfigDict(extra="allow")
    job_id: str
    status: str
    generated_at: str
    categories: list[CategoryReport]
    totals: ReportTotals
