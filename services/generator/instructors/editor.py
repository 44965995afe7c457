"""editor: text-correction pairs made from the job's own writing rows.

Runs in its own phase, after the main one, only once writing rows exist. The LLM is
asked to damage a writing row's response with one to three kinds of flaw; the pair
teaches the reverse: the damaged text in, the original out.
"""

from __future__ import annotations

from airoboros.contracts import BatchStats, Candidate, GenerateBatch, Item
from airoboros.generator.instructors.base import Filtered, Instructor
from airoboros.templates import render

DEFECTS = [
    "a few misspelled words",
    "several grammatical errors",
    "simplified wording, as a young child would write it",
    "letters swapped or reversed inside some words, as in dyslexic writing",
    "run-on sentences that sprawl without punctuation",
    "easily confused words used wrongly (their/there, affect/effect, then/than)",
]

EDIT_INSTRUCTION = "Rewrite the following text to improve/correct it.\n\nText: {text}"


class Editor(Instructor):
    name = "editor"
    prompt_file = "editor.txt"

    async def propose(self, task: GenerateBatch, stats: BatchStats) -> list[Candidate]:
        return [Candidate(instruction=i["text"], dedupe_text=i["text"]) for i in task.inputs]

    async def respond(self, candidate: Candidate, stats: BatchStats) -> list[Item]:
        original = candidate.instruction
        rng = self.ctx.rng
        defects = rng.sample(DEFECTS, rng.randint(1, 3))
        prompt = render(
            self.prompt_template,
            defects="\n".join(f"- {d}" for d in defects),
            text=original,
        )
        damaged = (await self.ask(prompt)).strip()
        if damaged.upper().startswith("TEXT:"):
            damaged = damaged[5:].strip()
        if not damaged or damaged == original.strip():
            raise Filtered("the text came back unchanged")
        if len(damaged) < 0.5 * len(original) or len(damaged) > 2 * len(original):
            raise Filtered("the damaged text is not a rewrite of the original")
        return [self.item(EDIT_INSTRUCTION.format(text=damaged), original)]


EDITOR_INSTRUCTORS: list[type[Instructor]] = [Editor]
