"""The airoboros YAML config: every key of the original tool, plus additions.

Keys keep the original meaning and defaults (see docs/configuration.md). Validation
collects every problem at once, each naming its key, and raises one ``ConfigError``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from airoboros.errors import ConfigError

#: The original's default readability hint, injected as {flesch}.
DEFAULT_FLESCH = (
    "The output should be written in such a way as to have a Flesch-Kincaid "
    "readability score of 30 or lower - best understood by those with college education."
)

#: Top-level api_params the original reads (and their defaults since its PR #33).
DEFAULT_API_PARAMS: dict[str, float] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
}

#: USD per one million tokens (prompt, completion). Users add their own under `prices:`.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4": (30.0, 60.0),
    "gpt-4-32k": (60.0, 120.0),
    "gpt-4-turbo": (10.0, 30.0),
    "gpt-4-turbo-preview": (10.0, 30.0),
    "gpt-4-1106-preview": (10.0, 30.0),
    "gpt-4-0125-preview": (10.0, 30.0),
    "gpt-4o": (2.5, 10.0),
    "gpt-4o-mini": (0.15, 0.6),
    "gpt-4.1": (2.0, 8.0),
    "gpt-4.1-mini": (0.4, 1.6),
    "gpt-3.5-turbo": (0.5, 1.5),
}

_STRICT = ConfigDict(extra="forbid", populate_by_name=True)
#: Sanity bounds on numbers (a value past them is a mistake, or an attack on a service;
#: the services bound counts and batch sizes more tightly: airoboros.policy).
_HUGE = 10**12
_DAY = 86_400.0


class Price(BaseModel):
    """USD per one million tokens."""

    model_config = _STRICT
    prompt: float = Field(ge=0)
    completion: float = Field(ge=0)
    #: (new) the share of the price a Batch API call pays (OpenAI: 0.5). Unset: 0.5 for
    #: the models of DEFAULT_PRICES, 1.0 (no discount) for any other model.
    batch_discount: float | None = Field(default=None, ge=0, le=1)


class InstructorConfig(BaseModel):
    """One block under `instructors:`. Instructor-specific keys (coding_languages,
    styles, ...) are kept as extras and validated by the instructor itself."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    count: int | None = Field(default=None, ge=0, le=_HUGE)
    batch_size: int | None = Field(default=None, ge=1, le=100_000)
    api_params: dict[str, Any] = Field(default_factory=dict)
    min_docsearch_score: float | None = Field(default=None, ge=0, le=4)
    language: str | None = None
    flesch: str | None = None
    prompt_path: str | None = None
    response_prompt_path: str | None = None
    topics_path: str | None = None
    topic_avoidance: str | None = None
    #: Model for this instructor's calls (the original validated this key but never used it).
    model: str | None = None
    #: (new) this instructor's calls go through the Batch API (None: the top-level ``batch``)
    batch: bool | None = None
    #: (new) structured output for this instructor's calls; unset: the top-level key
    structured_output: Literal["auto", "json_schema", "off"] | None = None

    @field_validator("flesch", mode="before")
    @classmethod
    def _flesch_text(cls, v: Any) -> Any:
        # The original's multiple_choice default is the bare number "40"; accept numbers.
        return str(v) if isinstance(v, int | float) else v

    def extra(self, key: str, default: Any = None) -> Any:
        return (self.model_extra or {}).get(key, default)


class Config(BaseModel):
    """The whole config file. Unknown top-level keys are warnings, not errors, so
    configs written for other versions of the tool still load."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    #: set by with_credentials: base_url and openai_api_key are final (no environment)
    _credentials_settled: bool = PrivateAttr(default=False)

    # --- keys of the original tool ---
    model: str = "gpt-4"
    openai_api_key: str | None = None
    organization_id: str | None = None
    vertexai_credentials_path: str | None = None
    vertexai_project_id: str | None = None
    vertexai_publisher: str | None = None
    vertexai_region: str | None = None
    output_path: str = "instructions.jsonl"
    topics_path: str = "topics.txt"
    overwrite: bool = False
    append: bool = False
    embedding_model: str | None = None
    embedding_device: str = "cpu"
    #: (new) auto | float32 | bfloat16: auto is bfloat16 where the device computes it natively
    embedding_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    topic_avoidance: str = ""
    response_filters: list[str] = Field(default_factory=list)
    #: The original's *global* token budget (sum of usage.total_tokens), not a per-call limit.
    max_tokens: int | None = Field(default=None, ge=1, le=10**15)
    min_docsearch_score: float = Field(default=0.35, ge=0, le=4)
    api_params: dict[str, Any] = Field(default_factory=dict)
    topic_prompt: str | None = None
    topic_request_count: int = Field(default=20, ge=1, le=100_000)
    default_count: int = Field(default=100, ge=0, le=_HUGE)
    default_batch_size: int = Field(default=5, ge=1, le=100_000)
    default_flesch: str = DEFAULT_FLESCH
    language: str = "English"
    instructors: dict[str, InstructorConfig] = Field(default_factory=dict)
    scoring: dict[str, Any] = Field(default_factory=dict)
    judge: dict[str, Any] = Field(default_factory=dict)
    #: cull-instructions: the most rows in one near-duplicate cluster (the original's k)
    cull_max_k: int = Field(default=1000, ge=1, le=1_000_000)
    #: (new) cull-instructions: the judge keeps a row whose silent 0-100 score is at least
    #: this. Unset: the original's scoring.threshold, else 100 (see docs/culling.md)
    cull_threshold: int | None = Field(default=None, ge=0, le=100)

    # --- additions ---
    base_url: str | None = None
    api: Literal["chat", "completions"] = "chat"
    #: Inline topics, used instead of topics_path when given.
    topics: list[str] | None = None
    max_concurrency: int = Field(default=32, ge=1, le=100_000)
    requests_per_minute: float | None = Field(default=None, gt=0, le=1e9)
    tokens_per_minute: float | None = Field(default=None, gt=0, le=1e12)
    #: Adapt the calls in flight (1..max_concurrency) to what the endpoint accepts (AIMD
    #: on 429, 503 and timeouts). Unset: on unless requests_per_minute/tokens_per_minute
    #: is set, and off once the endpoint's x-ratelimit-* headers give its limits.
    adaptive_concurrency: bool | None = None
    #: Budget in USD; new calls stop the moment it is reached.
    max_cost: float | None = Field(default=None, gt=0, le=1e9)
    prices: dict[str, Price] = Field(default_factory=dict)
    request_timeout: float = Field(default=600.0, gt=0, le=_DAY)
    max_retries: int = Field(default=6, ge=0, le=1000)
    #: Upper bound on the total time spent retrying one call, in seconds.
    max_retry_time: float = Field(default=300.0, gt=0, le=_DAY)
    #: Max tokens per completion request (the original left this to the server).
    max_completion_tokens: int | None = Field(default=None, ge=1, le=10_000_000)
    #: A category stops (the job ends "incomplete", rows kept) after this many batches in
    #: a row without a single usable item: every answer refused, unparseable, filtered,
    #: or its calls failed. While items keep coming it never stops.
    max_failed_batches: int = Field(default=20, ge=1, le=1_000_000)
    #: ... or after this many batches in a row whose every usable item was a duplicate.
    max_duplicate_batches: int = Field(default=100, ge=1, le=1_000_000)
    #: SQL store URL; default: a SQLite file beside output_path.
    database_url: str | None = None
    #: Object store URL; default: a local folder beside output_path.
    object_store_url: str | None = None
    #: Vector store URL; default: in-process faiss.
    vector_store_url: str | None = None
    #: Send the calls through the OpenAI Batch API (half price, answers within
    #: ``batch_completion_window``); per instructor with ``instructors.<name>.batch``.
    batch: bool = False
    batch_completion_window: str = Field(default="24h", pattern=r"^[0-9]{1,4}h$")
    #: Batch jobs open at once per instructor (the calls of later tasks wait for a slot).
    batch_max_open: int = Field(default=2, ge=1, le=1000)
    #: Submissions of one request (an expired or failed batch, a failed line) before its
    #: call counts as failed.
    batch_max_attempts: int = Field(default=3, ge=1, le=100)
    #: Seconds between polls of an open batch (growing to 30x this while it stays open).
    batch_poll_interval: float = Field(default=5.0, gt=0, le=3600)
    #: Requests in one batch job at most (OpenAI allows 50,000).
    batch_max_requests: int = Field(default=50_000, ge=1, le=50_000)
    #: Ask for a JSON schema of the items (response_format) instead of marker formats:
    #: auto probes the endpoint once per (base_url, model), json_schema always asks (a
    #: refusal is an error), off never asks.
    structured_output: Literal["auto", "json_schema", "off"] = "auto"

    # ---------------------------------------------------------------------------------
    @property
    def unknown_keys(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())

    def instructor(self, name: str) -> InstructorConfig:
        return self.instructors[name]

    def count_for(self, name: str) -> int:
        c = self.instructors[name].count
        return self.default_count if c is None else c

    def batch_size_for(self, name: str) -> int:
        b = self.instructors[name].batch_size
        return self.default_batch_size if b is None else b

    def language_for(self, name: str) -> str:
        return self.instructors[name].language or self.language

    def flesch_for(self, name: str) -> str:
        return self.instructors[name].flesch or self.default_flesch

    def topic_avoidance_for(self, name: str) -> str:
        ta = self.instructors[name].topic_avoidance
        return self.topic_avoidance if ta is None else ta

    def model_for(self, name: str) -> str:
        inst = self.instructors[name]
        return inst.model or inst.api_params.get("model") or self.model

    def batch_for(self, name: str) -> bool:
        """Whether ``name``'s calls go through the Batch API (the instructor's key wins)."""
        own = self.instructors[name].batch if name in self.instructors else None
        return self.batch if own is None else own

    def batch_discount_for(self, model: str) -> float:
        """The share of the online price a Batch API call of ``model`` pays."""
        own = self.prices.get(model)
        if own is not None and own.batch_discount is not None:
            return own.batch_discount
        family = any(model == m or model.startswith(m + "-") for m in DEFAULT_PRICES)
        return 0.5 if family else 1.0

    def structured_output_for(self, name: str) -> str:
        s = self.instructors[name].structured_output if name in self.instructors else None
        return self.structured_output if s is None else s

    def min_docsearch_score_for(self, name: str) -> float:
        s = self.instructors[name].min_docsearch_score
        return self.min_docsearch_score if s is None else s

    def api_params_for(self, name: str) -> dict[str, Any]:
        """Global api_params overlaid with the instructor's (explicit zeros kept)."""
        params = dict(DEFAULT_API_PARAMS)
        params.update({k: v for k, v in self.api_params.items() if v is not None})
        params.update({k: v for k, v in self.instructors[name].api_params.items() if v is not None})
        params.pop("model", None)
        return params

    def api_params_for_topics(self) -> dict[str, Any]:
        params = dict(DEFAULT_API_PARAMS)
        params.update({k: v for k, v in self.api_params.items() if v is not None})
        params.pop("model", None)
        return params

    def price_for(self, model: str) -> Price | None:
        if model in self.prices:
            return self.prices[model]
        # Dated snapshots (gpt-4-0613) are priced like their family.
        candidates = [m for m in DEFAULT_PRICES if model == m or model.startswith(m + "-")]
        if not candidates:
            return None
        p, c = DEFAULT_PRICES[max(candidates, key=len)]
        return Price(prompt=p, completion=c)

    def resolved_api_key(self) -> str | None:
        if self._credentials_settled:
            return self.openai_api_key
        return self.openai_api_key or os.environ.get("OPENAI_API_KEY")

    def resolved_base_url(self) -> str | None:
        if self._credentials_settled:
            return self.base_url
        return self.base_url or os.environ.get("OPENAI_BASE_URL") or None

    def with_credentials(self, base_url: str | None, api_key: str | None) -> Config:
        """This config with its endpoint and key decided by someone else (the services'
        policy): no fallback to OPENAI_* environment variables any more."""
        out = self.model_copy(update={"base_url": base_url, "openai_api_key": api_key})
        out._credentials_settled = True
        return out

    def output_dir(self) -> Path:
        return Path(self.output_path).resolve().parent

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        out = Path(self.output_path).resolve()
        return f"sqlite+aiosqlite:///{out.with_name(out.name + '.sqlite')}"

    def resolved_object_store_url(self) -> str:
        if self.object_store_url:
            return self.object_store_url
        out = Path(self.output_path).resolve()
        return f"file://{out.with_name(out.name + '.objects')}"


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(root)"


def parse_config(data: Any, *, source: str = "config") -> Config:
    """Validate a mapping as a Config, reporting every problem at once: schema errors and
    the checks of regexes and instructor-specific keys are collected together."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: expected a mapping of keys, got {type(data).__name__}"])
    problems: list[str] = []
    cfg: Config | None = None
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        problems.extend(f"{_loc(e['loc'])}: {e['msg']}" for e in exc.errors())
    problems.extend(_raw_problems(data))
    if cfg is not None:
        problems.extend(_model_problems(cfg))
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    assert cfg is not None
    return cfg


def load_config(path: str | Path) -> Config:
    p = Path(path)
    if not p.exists():
        raise ConfigError([f"config file not found: {p}"])
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"{p}: not valid YAML{where}"]) from None
    return parse_config(data, source=str(p))


def _raw_problems(data: dict[str, Any]) -> list[str]:
    """Checks that work on the raw mapping, so they run even when the schema fails."""
    from airoboros.catalog import known_instructors, validate_instructor
    from airoboros.llm.filters import compile_filter

    problems: list[str] = []
    filters = data.get("response_filters")
    if isinstance(filters, list):
        for i, pattern in enumerate(filters):
            if not isinstance(pattern, str):
                continue
            try:
                compile_filter(pattern)
            except ValueError as exc:
                problems.append(f"response_filters.{i}: {exc}")
    instructors = data.get("instructors")
    if isinstance(instructors, dict):
        known = known_instructors()
        for name, block in instructors.items():
            if name not in known:
                continue  # a warning in the plan, like the original's "skipping"
            if block is not None and not isinstance(block, dict):
                # The schema reports it (instructors.<name>: a mapping is expected).
                continue
            try:
                inst = InstructorConfig.model_validate(block or {})
            except ValidationError:
                inst = InstructorConfig.model_construct(
                    **{k: v for k, v in (block or {}).items() if isinstance(k, str)}
                )
            problems.extend(f"instructors.{name}.{p}" for p in validate_instructor(name, inst))
    return problems


def _model_problems(cfg: Config) -> list[str]:
    """Cross-key checks on a schema-valid config."""
    problems: list[str] = []
    if cfg.vector_store_url and not cfg.vector_store_url.startswith("faiss"):
        problems.append(
            f"vector_store_url: {cfg.vector_store_url!r} is not available in an embedded run "
            "(use faiss://, or run the dedupe service for Weaviate)"
        )
    if cfg.api == "completions":
        for name in ["(top level)", *cfg.instructors]:
            mode = (
                cfg.structured_output if name == "(top level)" else cfg.structured_output_for(name)
            )
            if mode == "json_schema":
                key = (
                    "structured_output"
                    if name == "(top level)"
                    else f"instructors.{name}.structured_output"
                )
                problems.append(
                    f"{key}: json_schema needs api: chat (the completions API has no "
                    "response_format); use auto or off"
                )
    if cfg.max_cost is not None:
        for name in ["(top level)", *cfg.instructors]:
            model = cfg.model if name == "(top level)" else cfg.model_for(name)
            if cfg.price_for(model) is None:
                problems.append(
                    f"prices.{model}: max_cost is set but model {model!r} has no price; "
                    "add prices: {" + model + ": {prompt: USD_PER_1M, completion: USD_PER_1M}}"
                )
    return problems
