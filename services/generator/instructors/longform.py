"""Long answers: ``experience`` (guided immersive experiences) and ``detailed_writing``
(pieces of several thousand words, written in parts and then combined).

Neither applies the refusal filter (reference §1.3): long creative answers trip the
filter's patterns far more often than they contain a refusal.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, ClassVar

from airoboros.catalog import read_seed_tasks
from airoboros.contracts import BatchStats, Candidate, GenerateBatch, Item
from airoboros.generator.instructors.base import (
    PROMPTS_DIR,
    Ctx,
    Filtered,
    Instructor,
    gather_candidates,
    load_prompt,
)
from airoboros.templates import render

# --- experience -------------------------------------------------------------------------

_EXPERIENCE = re.compile(r"SETTING:\s*(.*?)\s*EXPERIENCE:\s*(.*)", re.S)

#: kinds of place, one drawn per call: identical prompts sent concurrently come back
#: alike far more often than prompts that differ
EXPERIENCE_THEMES = [
    "a natural wonder seen up close",
    "an invented city with customs of its own",
    "a fantastical realm that follows its own rules of nature",
    "a historical place at a precise moment in its past",
    "a place deep underwater",
    "a journey through space or on another world",
    "a quiet, restorative place suited to a guided meditation",
    "a bustling market, festival or celebration",
    "a journey through something microscopic, such as the inside of a cell",
    "a remote place few people ever visit",
    "an artist's workshop or a place where something is made by hand",
    "a journey through a piece of music, a painting or a story",
]


def parse_experience(text: str) -> tuple[str, str] | None:
    """(setting with the user's request, experience), or None if either is missing."""
    m = _EXPERIENCE.search(text)
    if not m:
        return None
    setting, experience = m.group(1).strip(), m.group(2).strip()
    if not setting or not experience:
        return None
    return setting, experience


class Experience(Instructor):
    """``batch_size`` independent calls, each returning one ``SETTING:`` (the setting and
    the user's request: the instruction) and one ``EXPERIENCE:`` (the response)."""

    name = "experience"
    filter_responses = False

    @property
    def word_count(self) -> int:
        return int(self.ctx.inst.extra("word_count", 800))

    def prompt(self) -> str:
        return render(
            self.prompt_template,
            language=self.ctx.language,
            flesch=self.ctx.flesch,
            topic_avoidance=self.ctx.topic_avoidance,
            word_count=self.word_count,
            theme=self.ctx.rng.choice(EXPERIENCE_THEMES),
        )

    async def _one(self, stats: BatchStats) -> Candidate | None:
        try:
            text = await self.ask(self.prompt())
        except Filtered as f:
            f.count(stats)
            return None
        parsed = parse_experience(text)
        if parsed is None:
            stats.unparseable += 1
            return None
        setting, experience = parsed
        return Candidate(instruction=setting, response=experience)

    async def propose(self, task: GenerateBatch, stats: BatchStats) -> list[Candidate]:
        return await gather_candidates([self._one(stats) for _ in range(task.batch_size)], stats)


# --- detailed_writing -------------------------------------------------------------------

INNER_PART = (
    "Now write the second part, at least {third} words long, carrying straight on from "
    "where the first part ended. This is still not the end: add no conclusion or closing "
    "summary, do not say that more will follow, and stop at a point where the final part "
    "can continue smoothly. Keep writing in {language}. Output only the second part."
)
FINAL_PART = (
    "Now write the final part, at least {third} words long, carrying on from where the "
    "second part ended and bringing the whole piece to a satisfying close. Keep writing in "
    "{language}. Output only the final part."
)
COMBINE = (
    "Now rewrite the three parts above as one finished piece that fulfils the task. Smooth "
    "the joins between the parts and the flow of the whole, use a rich and varied "
    "vocabulary, add vivid detail, make sure every requirement of the task is met, and "
    "remove anything the task did not ask for that contradicts it. Do not shorten it: the "
    "rewrite must be at least as long as the three parts together. Write in {language}, "
    "and output only the finished piece."
)
LENGTH_SENTENCE = " Your response should be approximately {n} words."

_EXAMPLE = re.compile(r"BEGINEXAMPLE\s*(.*?)\s*ENDEXAMPLE", re.S)
DEFAULT_SEEDS = "detailed_writing_seeds.txt"


def load_seeds(path: str) -> list[str]:
    """Seed tasks (airoboros.catalog.read_seed_tasks) from ``path``: a folder of ``*.txt``
    files or one file of BEGINEXAMPLE ... ENDEXAMPLE blocks; a user path wins over the
    packaged file."""
    p = Path(path)
    source = next(
        (c for c in (p, PROMPTS_DIR / p.name, PROMPTS_DIR / f"{p.stem}.txt") if c.exists()),
        None,
    )
    if source is None:
        raise FileNotFoundError(f"seed path not found: {path}")
    return read_seed_tasks(source)


def clean_task(text: str) -> str:
    """The new task, without any example markers the model echoed back."""
    m = _EXAMPLE.search(text)
    if m:
        text = m.group(1)
    return text.replace("BEGINEXAMPLE", "").replace("ENDEXAMPLE", "").strip()


class DetailedWriting(Instructor):
    """Step 1: ``batch_size`` calls, each writing a new long-form task from a seed task and
    a topic (dedupe screens them). Step 2, per accepted task, in one conversation: the
    first third, the second part, the final part, then a rewrite of the three as one
    piece. Each part asks for ``word_count * 1.3 / 3`` words (words are not tokens, and
    models undershoot). An empty or truncated answer is asked again, a bounded number of
    times. The stored instruction says how long the answer actually is."""

    name = "detailed_writing"
    filter_responses = False
    response_prompt_file: ClassVar[str] = "detailed_writing_response.txt"
    #: tries per call of step 2 (an empty or truncated answer is asked again)
    attempts: ClassVar[int] = 3

    def __init__(self, ctx: Ctx) -> None:
        super().__init__(ctx)
        rp = ctx.inst.response_prompt_path or self.response_prompt_file
        self.response_template = load_prompt(rp)
        self.seeds = load_seeds(str(ctx.inst.extra("seed_path") or DEFAULT_SEEDS))
        if not self.seeds:
            raise ValueError(f"{self.name}: no seed tasks found")
        self._seed_index = ctx.rng.randrange(len(self.seeds))

    @property
    def word_count(self) -> int:
        return int(self.ctx.inst.extra("word_count", 4000))

    @property
    def third(self) -> int:
        return int(self.word_count * 1.3 / 3)

    def next_seed(self) -> str:
        seed = self.seeds[self._seed_index % len(self.seeds)]
        self._seed_index += 1
        return seed

    def task_prompt(self, topic: str | None) -> str:
        return render(
            self.prompt_template,
            example=f"BEGINEXAMPLE\n{self.next_seed()}\nENDEXAMPLE",
            topic=json.dumps(topic, ensure_ascii=False) if topic else "a subject of your choice",
            flesch=self.ctx.flesch,
            language=self.ctx.language,
            topic_avoidance=self.ctx.topic_avoidance,
        )

    def first_prompt(self, instruction: str) -> str:
        return render(
            self.response_template,
            instruction=instruction,
            flesch=self.ctx.flesch,
            language=self.ctx.language,
            word_count=int(self.word_count * 1.3),
            third=self.third,
        )

    async def _task(self, topic: str | None, stats: BatchStats) -> Candidate | None:
        try:
            text = clean_task(await self.ask(self.task_prompt(topic)))
        except Filtered as f:
            f.count(stats)
            return None
        if not text:
            stats.unparseable += 1
            return None
        return Candidate(instruction=text)

    async def propose(self, task: GenerateBatch, stats: BatchStats) -> list[Candidate]:
        # Each accepted task costs four long calls: make no more than the rows still needed.
        n = max(1, min(task.batch_size, task.remaining))
        topics: list[str | None] = [*task.topics[:n], *[None] * (n - len(task.topics[:n]))]
        return await gather_candidates([self._task(t, stats) for t in topics], stats)

    async def ask_again(self, prompt: str, history: list[dict[str, str]]) -> str:
        """``ask``, repeated while the answer is empty or truncated (bounded)."""
        last: Filtered | None = None
        for _ in range(self.attempts):
            try:
                return await self.ask(prompt, history=history)
            except Filtered as f:
                last = f
        assert last is not None
        raise last

    async def respond(self, candidate: Candidate, stats: BatchStats) -> list[Item]:
        values: dict[str, Any] = {"third": self.third, "language": self.ctx.language}
        prompts = [
            self.first_prompt(candidate.instruction),
            INNER_PART.format(**values),
            FINAL_PART.format(**values),
            COMBINE.format(**values),
        ]
        history: list[dict[str, str]] = []
        text = ""
        for prompt in prompts:
            text = await self.ask_again(prompt, history)
            history += [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]
        instruction = candidate.instruction + LENGTH_SENTENCE.format(n=len(text.split()))
        return [self.item(instruction, text)]


LONGFORM_INSTRUCTORS: list[type[Instructor]] = [Experience, DetailedWriting]
