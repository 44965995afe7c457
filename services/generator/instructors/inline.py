"""Instructors of the inline shape: trivia, orca, riddle, joke, multiple_choice, agent."""

from __future__ import annotations

import re
import string
from typing import Any

from airoboros.contracts import BatchStats, Candidate, GenerateBatch, Item
from airoboros.generator.instructors.base import Filtered, InlineInstructor

TRIVIA_SYSTEM = "You are a world-class trivia AI: give accurate, succinct answers."
TRIVIA_DETAIL = " Give a little context or detail along with the answer."

_STARTS = re.compile(r"(?:starts?|begins?) with (?:the letters? )?['\"]?([^'\"\s?,.]+)['\"]?", re.I)
_ENDS = re.compile(r"ends? with (?:the letters? )?['\"]?([^'\"\s?,.]+)['\"]?", re.I)
_CONTAINS = re.compile(r"contains? (?:the letters? )?['\"]([^'\"]+)['\"]", re.I)


class Trivia(InlineInstructor):
    """Jeopardy-style trivia with a system prompt; about half the questions are asked a
    second time without it, for an answer with context (an extra row)."""

    name = "trivia"

    def accept_pair(self, instruction: str, response: str) -> bool:
        answer = response.strip().strip(".!\"'").lower()
        words = answer.split()
        if not words:
            return False
        if (m := _STARTS.search(instruction)) and not answer.startswith(m.group(1).lower()):
            return False
        if (m := _ENDS.search(instruction)) and not answer.endswith(m.group(1).lower()):
            return False
        return not ((m := _CONTAINS.search(instruction)) and m.group(1).lower() not in answer)

    def make_candidate(self, instruction: str, response: str) -> Candidate:
        detail = self.ctx.rng.random() < 0.5
        return Candidate(
            instruction=instruction,
            response=response,
            system=TRIVIA_SYSTEM,
            meta={"detail": detail},
            # The detail row counts too: room for both is reserved before it is paid for.
            counts=2 if detail else 1,
        )

    async def respond(self, candidate: Candidate, stats: BatchStats) -> list[Item]:
        rows = [self.item(candidate.instruction, candidate.response or "", system=candidate.system)]
        # Only when the count has room for it (the controller grants ``counts`` rows).
        if candidate.meta.get("detail") and candidate.counts >= 2:
            # As the original: the request for detail is part of the row's instruction,
            # so the two rows of one question never share their instruction text.
            detail = candidate.instruction + TRIVIA_DETAIL
            try:
                rows.append(self.item(detail, await self.ask(detail)))
            except Filtered as f:
                f.count(stats)
        return rows


class Orca(InlineInstructor):
    name = "orca"


class Riddle(InlineInstructor):
    name = "riddle"


class Joke(InlineInstructor):
    name = "joke"


class Agent(InlineInstructor):
    name = "agent"
    start_key = "PROMPT"
    end_key = "ANSWER"
    filter_responses = False


DEFAULT_OPTION_E = ["None of the above", "All of the above", "Both A and B", "Cannot be determined"]


class MultipleChoice(InlineInstructor):
    """Multiple choice with the correct letter forced per question (models otherwise
    favour B and C), an optional option E, and an optional context paragraph. The answer
    must appear verbatim among the question's options."""

    name = "multiple_choice"

    @property
    def flesch_default(self) -> str:
        return self.ctx.inst.flesch or "40"

    def extra_values(self, task: GenerateBatch) -> dict[str, Any]:
        rng = self.ctx.rng
        with_e = rng.random() < 0.3
        letters = string.ascii_uppercase[: 5 if with_e else 4]
        # An even spread of correct letters, shuffled.
        answers = [letters[i % len(letters)] for i in range(task.batch_size)]
        rng.shuffle(answers)
        ratio = float(self.ctx.inst.extra("contextual_ratio", 0.2))
        with_context = [i + 1 for i in range(task.batch_size) if rng.random() < ratio]
        context = ""
        if with_context:
            nums = ", ".join(str(i) for i in with_context)
            context = (
                f"- Questions {nums} begin with a short paragraph of background that the "
                "question is about."
            )
        option_e = ""
        if with_e:
            option_e = f' and "E) {rng.choice(DEFAULT_OPTION_E)}"'
        return {
            "answers": "\n".join(f"  - question {i + 1}: {a}" for i, a in enumerate(answers)),
            "options": option_e,
            "context": context,
            "flesch": f"- The readability should suit a Flesch reading-ease score around {self.flesch_default}."
            if self.flesch_default.strip().isdigit()
            else self.flesch_default,
        }

    def accept_pair(self, instruction: str, response: str) -> bool:
        answer = response.strip()
        if not re.match(r"^[A-E][).:]", answer):
            return False
        return answer.rstrip(".") in instruction or answer in instruction


INLINE_INSTRUCTORS: list[type[InlineInstructor]] = [
    Trivia, Orca, Riddle, Joke, Agent, MultipleChoice,
]  # fmt: skip
