"""The instructor contract and the two engines of the original tool.

An instructor turns one ``GenerateBatch`` into candidates (``propose``: step 1) and each
candidate that dedupe accepted into rows (``respond``: step 2). Two shapes cover most
task families:

* ``TaskListInstructor``: step 1 asks for a numbered ``TSK n.`` list of tasks; step 2
  makes one response call per accepted task (so no money is spent answering duplicates).
* ``InlineInstructor``: one call returns ``QUESTION:``/``ANSWER:`` pairs (or the
  instructor's own markers); step 2 only shapes the row.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from airoboros.catalog import CATALOG, InstructorSpec
from airoboros.config import Config, InstructorConfig
from airoboros.contracts import Artifact, BatchStats, Candidate, GenerateBatch, Item
from airoboros.errors import BadRequestError
from airoboros.generator.instructors.structured import (
    TASKS,
    ItemShape,
    StructuredOutputRefused,
    as_pairs,
    pairs,
)
from airoboros.llm import LLMClient, ResponseFilter
from airoboros.llm.filters import REFUSAL_OPENINGS
from airoboros.llm.structured import refused_format
from airoboros.templates import render

log = logging.getLogger(__name__)

#: The stats of the batch being worked on, so every call's tokens are charged to it.
current_batch: ContextVar[BatchStats | None] = ContextVar("current_batch", default=None)

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"


def load_prompt(name_or_path: str) -> str:
    """A user path (absolute or relative to the working directory) wins over the
    packaged prompt of the same name."""
    p = Path(name_or_path)
    if p.is_file():
        return p.read_text(encoding="utf-8")
    packaged = PROMPTS_DIR / p.name
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    raise FileNotFoundError(f"prompt not found: {name_or_path}")


def prompt_exists(name_or_path: str) -> bool:
    return Path(name_or_path).is_file() or (PROMPTS_DIR / Path(name_or_path).name).is_file()


_TSK = re.compile(
    r"(?:^|\n)[ \t]*TSK[ \t]*(\d+)[ \t]*[.:)][ \t]*(.*?)(?=\n[ \t]*TSK[ \t]*\d+[ \t]*[.:)]|\Z)",
    re.S,
)


def parse_tasks(text: str) -> list[str]:
    """Tasks from a ``TSK n.`` list; tolerant of spacing and of 'TSK 1:'/'TSK 1)'."""
    return [t.strip() for _, t in _TSK.findall(text) if t.strip()]


def parse_pairs(text: str, start: str = "QUESTION", end: str = "ANSWER") -> list[tuple[str, str]]:
    """(instruction, response) pairs from ``START: ... END: ...`` blocks."""
    pattern = re.compile(rf"{start}:\s*(.*?)\s*{end}:\s*(.*?)\s*(?={start}:|\Z)", re.S)
    pairs = []
    for q, a in pattern.findall(text):
        q, a = q.strip(), a.strip()
        if q and a:
            pairs.append((q, a))
    return pairs


@dataclass
class Ctx:
    """What an instructor needs at run time. Built once per instructor per process."""

    name: str
    config: Config
    llm: LLMClient
    rng: random.Random = field(default_factory=random.Random)

    @property
    def inst(self) -> InstructorConfig:
        return self.config.instructors[self.name]

    @property
    def model(self) -> str:
        return self.config.model_for(self.name)

    @property
    def language(self) -> str:
        return self.config.language_for(self.name)

    @property
    def flesch(self) -> str:
        return self.config.flesch_for(self.name)

    @property
    def topic_avoidance(self) -> str:
        return self.config.topic_avoidance_for(self.name)

    @property
    def filter(self) -> ResponseFilter:
        return ResponseFilter(self.config.response_filters)


class Filtered(Exception):
    """A response was unusable (truncated, refusal, filter match, bad format)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def count(self, stats: BatchStats) -> None:
        """Count it in the batch's stats under its cause."""
        count_loss(stats, self.reason)


def count_loss(stats: BatchStats, reason: str) -> None:
    """One item (or single answer) lost, counted by cause: refusals, answers cut off by
    the token limit, answers in no usable format, and the rest (filters, checks)."""
    if reason == "refusal":
        stats.refused += 1
    elif reason == "truncated":
        stats.truncated += 1
    elif reason.startswith("unparseable"):
        stats.unparseable += 1
    else:
        stats.filtered += 1


@dataclass
class Reply:
    """One answer that holds many items: their filters are applied one item at a time."""

    text: str
    #: cut off by the token limit: its last item may be incomplete
    truncated: bool
    #: what the call cost, in tokens
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Spend:
    """Tokens spent on one unit of work (a candidate's response step), and how many of
    them were already counted as lost (unusable answers)."""

    tokens: float = 0.0
    lost: float = 0.0


#: The unit of work the calls of this task are for (set per candidate in step 2).
current_spend: ContextVar[Spend | None] = ContextVar("current_spend", default=None)


def lose(stats: BatchStats, tokens: float) -> None:
    """Count ``tokens`` as bought nothing, in the batch and in the current unit of work."""
    stats.lost_tokens += tokens
    spend = current_spend.get()
    if spend is not None:
        spend.lost += tokens


T = TypeVar("T")


class Instructor:
    """Base class. Subclasses set ``name`` and implement ``propose``/``respond``."""

    name: ClassVar[str]
    #: apply response_filters and the refusal check to its calls
    filter_responses: ClassVar[bool] = True
    #: prompt file name in prompts/ (without the path)
    prompt_file: ClassVar[str] = ""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self._filter = ctx.filter
        path = ctx.inst.prompt_path or self.prompt_file or f"{self.name}.txt"
        self.prompt_template = load_prompt(path) if prompt_exists(path) else ""

    @property
    def spec(self) -> InstructorSpec:
        """What planning knows of this instructor (phase, topics, dedupe scope, ...)."""
        return CATALOG[self.name]

    # --- LLM helpers ------------------------------------------------------------------
    def params(self, **overrides: Any) -> dict[str, Any]:
        p = self.ctx.config.api_params_for(self.name)
        p.update(overrides)
        return p

    async def _complete(
        self,
        prompt: str,
        system: str | None,
        history: list[dict[str, str]] | None,
        params: dict[str, Any],
    ) -> tuple[str, str | None, tuple[int, int]]:
        """One call: its text, finish reason and (prompt, completion) tokens, charged to
        the current batch."""
        messages: list[dict[str, str]] = []
        if system:
            messages.append({"role": "system", "content": system})
        messages.extend(history or [])
        messages.append({"role": "user", "content": prompt})
        c = await self.ctx.llm.complete(
            messages, model=self.ctx.model, instructor=self.name, params=self.params(**params)
        )
        batch = current_batch.get()
        if batch is not None:
            batch.requests += 1
            batch.retries += c.attempts - 1
            batch.prompt_tokens += c.prompt_tokens
            batch.completion_tokens += c.completion_tokens
            batch.cost += c.cost
            batch.excerpt = c.text[:400]
        spend = current_spend.get()
        if spend is not None:
            spend.tokens += c.prompt_tokens + c.completion_tokens
        return c.text, c.finish_reason, (c.prompt_tokens, c.completion_tokens)

    async def ask(
        self,
        prompt: str,
        *,
        system: str | None = None,
        history: list[dict[str, str]] | None = None,
        filter_response: bool | None = None,
        **params: Any,
    ) -> str:
        """One LLM call whose answer is one thing (a response, a passage); raises
        Filtered when it is unusable."""
        text, finish, tokens = await self._complete(prompt, system, history, params)
        apply = self.filter_responses if filter_response is None else filter_response
        reason = self._filter.reason(text, finish_reason=finish, apply_filters=apply)
        if reason:
            batch = current_batch.get()
            if batch is not None:
                lose(batch, sum(tokens))  # a call whose one answer is unusable
            raise Filtered(reason)
        return text.strip()

    async def ask_items(
        self,
        prompt: str,
        *,
        system: str | None = None,
        history: list[dict[str, str]] | None = None,
        **params: Any,
    ) -> Reply:
        """One LLM call whose answer holds many items (a task list, question/answer
        pairs): nothing is filtered here; ``usable`` filters the parsed items one by one,
        so one refused or filtered item costs that item only."""
        text, finish, (prompt_t, completion_t) = await self._complete(
            prompt, system, history, params
        )
        return Reply(text, finish == "length", prompt_t, completion_t)

    async def structured(self) -> bool:
        """Whether this instructor's item lists are asked for as JSON (its
        ``structured_output`` and, for auto, the endpoint's verdict)."""
        mode = self.ctx.config.structured_output_for(self.name)
        # A stand-in for the client (unit tests' canned replies) has no structured support.
        support = getattr(self.ctx.llm, "structured", None)
        if mode == "off" or support is None:
            return False
        return bool(await support.use_structured(mode, self.ctx.model, self.name))

    async def ask_shaped(
        self,
        prompt: str,
        shape: ItemShape,
        markers: Callable[[str], Sequence[tuple[str, ...]]],
        **params: Any,
    ) -> tuple[Reply, list[tuple[str, ...]]]:
        """``ask_items`` for a list of items of ``shape``: as JSON through
        ``response_format`` where structured output is used (the prompt's marker format
        replaced by the JSON shape), else in the prompt's marker format read by
        ``markers``. The items come back as the same tuples either way. In auto mode an
        endpoint that refuses the format after all is remembered as not supporting it and
        the call is made again with markers."""
        if await self.structured():
            try:
                reply = await self.ask_items(
                    shape.prompt(prompt), response_format=shape.response_format(), **params
                )
            except BadRequestError as exc:
                if not refused_format(exc):
                    raise
                if self.ctx.config.structured_output_for(self.name) == "json_schema":
                    raise StructuredOutputRefused(
                        f"structured_output is json_schema but the endpoint refused "
                        f"response_format for model {self.ctx.model!r} ({exc}); set "
                        "structured_output: auto (or off) for this endpoint",
                        status=exc.status,
                    ) from None
                self.ctx.llm.structured.refused(self.ctx.model)
            else:
                return reply, shape.parse(reply.text, reply.truncated)
        reply = await self.ask_items(prompt, **params)
        return reply, list(markers(reply.text))

    def usable(
        self,
        items: Sequence[T],
        reply: Reply,
        stats: BatchStats,
        *,
        texts: Callable[[T], Sequence[str]],
        limit: int | None = None,
        apply_filters: bool | None = None,
    ) -> list[T]:
        """The items parsed from ``reply`` that can be used, at most ``limit``: the last
        one of a reply cut off by the token limit is dropped (it may be incomplete, the
        rest are kept), and each refused or filtered item is dropped and counted. A reply
        without a single item is counted as refused (when it opens with a refusal) or
        unparseable."""
        apply = self.filter_responses if apply_filters is None else apply_filters
        # A reply's completion tokens are shared among its items by length: those of the
        # items lost here bought nothing (its prompt bought the items that are kept); a
        # reply without one usable item bought nothing at all.
        sizes = [sum(len(t) for t in texts(item)) + 1 for item in items]
        per_char = reply.completion_tokens / max(1, sum(sizes))
        if reply.truncated:
            stats.truncated += 1
            items, sizes = items[:-1], sizes[:-1]
        if limit is not None:
            items, sizes = items[:limit], sizes[:limit]
        out: list[T] = []
        kept = 0
        for item, size in zip(items, sizes, strict=True):
            reason = self._filter.item_reason(texts(item), apply_filters=apply)
            if reason:
                count_loss(stats, reason)
            else:
                out.append(item)
                kept += size
        if not items and not reply.truncated:
            refusal = apply and REFUSAL_OPENINGS.match(reply.text)
            count_loss(stats, "refusal" if refusal else "unparseable")
        if out:
            lose(stats, max(0.0, reply.completion_tokens - kept * per_char))
        else:
            lose(stats, reply.tokens)
        return out

    def common_values(self, task: GenerateBatch) -> dict[str, Any]:
        return {
            "batch_size": task.batch_size,
            "language": self.ctx.language,
            "flesch": self.ctx.flesch,
            "topic_avoidance": self.ctx.topic_avoidance,
            "topics": topic_lines(task.topics, self.topic_label),
        }

    topic_label: ClassVar[str] = "TSK"

    # --- the two steps ----------------------------------------------------------------
    async def propose(self, task: GenerateBatch, stats: BatchStats) -> list[Candidate]:
        raise NotImplementedError

    async def respond(self, candidate: Candidate, stats: BatchStats) -> Sequence[Item | Artifact]:
        """Rows (or artifacts) for one accepted candidate. Default: the inline pair."""
        if candidate.response is None:
            raise NotImplementedError(f"{self.name} must implement respond()")
        return [self.item(candidate.instruction, candidate.response, system=candidate.system)]

    def item(self, instruction: str, response: str, **extra: Any) -> Item:
        return Item(instruction=instruction, response=response, category=self.name, **extra)


async def gather_candidates(
    calls: Sequence[Awaitable[Candidate | list[Candidate] | None]], stats: BatchStats
) -> list[Candidate]:
    """Run the calls of one batch concurrently (each gives a candidate, a list of them or
    None). Failed calls are counted; the batch fails only when every call failed with an
    error, so the controller sees the error."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    out: list[Candidate] = []
    errors: list[BaseException] = []
    for r in results:
        if isinstance(r, BaseException):
            errors.append(r)
        elif isinstance(r, list):
            out.extend(r)
        elif r is not None:
            out.append(r)
    if errors and not out:
        raise errors[0]
    stats.failures += len(errors)
    return out


def topic_lines(topics: list[str], label: str) -> str:
    return "\n".join(
        f' * {label} {i + 1} must be related to topic: "{t}"' for i, t in enumerate(topics)
    )


class TaskListInstructor(Instructor):
    """Step 1: a ``TSK n.`` list. Step 2: one response per accepted task, with the
    ``<name>_response.txt`` prompt when one exists, else the raw task."""

    response_prompt_file: ClassVar[str | None] = None
    #: filter the responses (step 2) as well as the task list
    filter_task_responses: ClassVar[bool] = True

    def __init__(self, ctx: Ctx) -> None:
        super().__init__(ctx)
        rp = ctx.inst.response_prompt_path or self.response_prompt_file
        self.response_template = load_prompt(rp) if rp and prompt_exists(rp) else None

    def extra_values(self, task: GenerateBatch) -> dict[str, Any]:
        return {}

    async def propose(self, task: GenerateBatch, stats: BatchStats) -> list[Candidate]:
        prompt = render(
            self.prompt_template, **{**self.common_values(task), **self.extra_values(task)}
        )
        reply, found = await self.ask_shaped(
            prompt, TASKS, lambda text: [(t,) for t in parse_tasks(text)]
        )
        tasks = self.usable(
            [t for (t,) in found], reply, stats, texts=lambda t: (t,), limit=task.batch_size
        )
        return [self.candidate(t) for t in tasks]

    def candidate(self, task_text: str) -> Candidate:
        return Candidate(instruction=task_text)

    def response_prompt(self, candidate: Candidate) -> str:
        if self.response_template is None:
            return candidate.instruction
        return render(
            self.response_template,
            instruction=candidate.instruction,
            language=self.ctx.language,
            flesch=self.ctx.flesch,
        )

    async def respond(self, candidate: Candidate, stats: BatchStats) -> list[Item]:
        text = await self.ask(
            self.response_prompt(candidate), filter_response=self.filter_task_responses
        )
        return [self.item(candidate.instruction, text)]


class InlineInstructor(Instructor):
    """One call returns instruction/response pairs between the instructor's markers."""

    start_key: ClassVar[str] = "QUESTION"
    end_key: ClassVar[str] = "ANSWER"
    topic_label = "QUESTION"

    def extra_values(self, task: GenerateBatch) -> dict[str, Any]:
        return {}

    def accept_pair(self, instruction: str, response: str) -> bool:
        return True

    async def propose(self, task: GenerateBatch, stats: BatchStats) -> list[Candidate]:
        prompt = render(
            self.prompt_template, **{**self.common_values(task), **self.extra_values(task)}
        )
        reply, found = await self.ask_shaped(
            prompt,
            pairs(self.start_key, self.end_key),
            lambda text: parse_pairs(text, self.start_key, self.end_key),
        )
        qa = self.usable(
            as_pairs(found),
            reply,
            stats,
            texts=lambda qa: qa,
            limit=task.batch_size,
        )
        out = []
        for q, a in qa:
            if not self.accept_pair(q, a):
                stats.filtered += 1
                continue
            out.append(self.make_candidate(q, a))
        return out

    def make_candidate(self, instruction: str, response: str) -> Candidate:
        return Candidate(instruction=instruction, response=response)
