"""Instructors of the "tasks then responses" shape: general, wordgame, writing, coding."""

from __future__ import annotations

import re
from typing import Any

from airoboros.contracts import BatchStats, Candidate, GenerateBatch, Item
from airoboros.generator.instructors.base import Filtered, TaskListInstructor


class General(TaskListInstructor):
    name = "general"


class WordGame(TaskListInstructor):
    name = "wordgame"


DEFAULT_STYLES = [
    "happy", "sad", "tragic", "unexpected", "inspirational", "evil", "hilarious",
    "suspenseful", "horrific", "nostalgic", "thought-provoking", "enigmatic",
    "fantastical", "heartwarming", "romantic",
]  # fmt: skip


class Writing(TaskListInstructor):
    name = "writing"
    response_prompt_file = "writing_response.txt"

    def extra_values(self, task: GenerateBatch) -> dict[str, Any]:
        styles = self.ctx.inst.extra("styles") or DEFAULT_STYLES
        # About a quarter of the tasks get an explicit style.
        n = max(1, task.batch_size // 4)
        picks = [self.ctx.rng.choice(styles) for _ in range(n)]
        style_extra = "\n".join(
            f"- Assignment {self.ctx.rng.randint(1, task.batch_size)} should ask for a {s} style."
            for s in picks
        )
        return {"style_extra": style_extra}


_FENCE = re.compile(r"```[^\n]*\n(.*?)```", re.S)

PLAIN_INSTRUCTION = (
    "\n\nAnswer with the code only: no explanation, no comments outside the code, "
    "and no markdown code fences."
)


class Coding(TaskListInstructor):
    """Coding tasks. A share of ``plain_ratio`` become PLAINFORMAT rows: the stored
    instruction ends with " PLAINFORMAT" and the response is bare code."""

    name = "coding"
    filter_task_responses = False

    @property
    def plain_ratio(self) -> float:
        return float(self.ctx.inst.extra("plain_ratio", 0.5))

    def extra_values(self, task: GenerateBatch) -> dict[str, Any]:
        langs: list[str] = list(self.ctx.inst.extra("coding_languages") or ["python"])
        software: list[str] = list(self.ctx.inst.extra("related_software") or [])
        related = ""
        if software and task.batch_size > 3:
            pick = self.ctx.rng.choice(software)
            related = f"- One of the tasks must use {pick}."
        return {"languages": ", ".join(langs), "related_software": related}

    def candidate(self, task_text: str) -> Candidate:
        plain = self.ctx.rng.random() < self.plain_ratio
        instruction = task_text + " PLAINFORMAT" if plain else task_text
        # Dedupe on the task itself, so a PLAINFORMAT twin of a task is still a duplicate.
        return Candidate(instruction=instruction, dedupe_text=task_text, meta={"plain": plain})

    async def respond(self, candidate: Candidate, stats: BatchStats) -> list[Item]:
        plain = bool(candidate.meta.get("plain"))
        task = candidate.text_for_dedupe()
        text = await self.ask(task + PLAIN_INSTRUCTION if plain else task)
        if plain:
            m = _FENCE.search(text)
            if m:
                text = m.group(1).strip()
            if not text:
                raise Filtered("empty code")
        return [self.item(candidate.instruction, text)]


TASK_INSTRUCTORS: list[type[TaskListInstructor]] = [General, WordGame, Writing, Coding]
