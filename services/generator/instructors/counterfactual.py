"""counterfactual_contextual: closed-context questions over a true fact and a falsified
copy of it, so that a model learns to answer from the text it is given rather than from
what it remembers.

One call returns three numbered lists: ``FACTS:`` (true passages, each with its source
url in square brackets), ``COUNTER:`` (the same passages made wrong) and ``QUESTIONS:``
(one question per passage whose answer differs between the two). Fact ``i`` yields
exactly one candidate; its response step answers both versions, each wrapped as a
BEGININPUT ... ENDINSTRUCTION block with the same question, and returns the two rows.

Fixed from the original: it re-processed every earlier fact once per fact, so a batch
of five facts produced up to thirty rows with many repeats. Here each fact is handled
once. The two versions are one candidate (screened by dedupe on the true version), not
two: the falsified copy differs from the true one in a few words only, so dedupe would
reject it as a near-duplicate of its own twin.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from airoboros.contracts import BatchStats, Candidate, GenerateBatch, Item
from airoboros.generator.instructors.base import Ctx, Instructor, load_prompt
from airoboros.generator.instructors.contextual import valid_block
from airoboros.generator.instructors.structured import COUNTERFACTUALS
from airoboros.templates import render

#: requests for the source, one added to about half of the questions (the same one on
#: both versions of a fact, so that the two rows differ only in the context)
SOURCE_REQUESTS = [
    "Cite your source.",
    "What is your source?",
    "Include the source url.",
    "Where does this information come from?",
    "Provide a reference.",
    "[citation]",
    "Add the link you found this in.",
]

_SECTIONS = re.compile(
    r"^[ \t#*]*FACTS[ \t*]*:(.*?)^[ \t#*]*COUNTER[ \t*]*:(.*?)^[ \t#*]*QUESTIONS[ \t*]*:(.*)\Z",
    re.S | re.M,
)
_ITEM = re.compile(r"^[ \t]*(\d+)[.)][ \t]+(.*?)(?=^[ \t]*\d+[.)][ \t]|\Z)", re.S | re.M)
#: a marker inside a passage or question would break the block it is wrapped in
_MARKER = re.compile(r"BEGININPUT|ENDINPUT|BEGINCONTEXT|ENDCONTEXT|BEGININSTRUCTION|ENDINSTRUCTION")
_SOURCE = re.compile(r"\[(?:[^\]\n]*?:\s*)?(https?://[^\]\s]+)[^\]\n]*\]")


@dataclass(frozen=True)
class Fact:
    number: int
    fact: str
    counter: str
    question: str
    source: str | None


def numbered(section: str) -> dict[int, str]:
    """``n. text`` items of one section (multi-line items allowed); the first of a
    repeated number wins."""
    items: dict[int, str] = {}
    for num, text in _ITEM.findall(section):
        text = text.strip()
        if text and int(num) not in items:
            items[int(num)] = text
    return items


def split_source(text: str) -> tuple[str, str | None]:
    """The text without its ``[source: https://...]`` tag, and the url if there was one."""
    m = _SOURCE.search(text)
    if not m:
        return text.strip(), None
    return (text[: m.start()] + text[m.end() :]).strip(), m.group(1).rstrip(".,;")


def parse_counterfactual(text: str) -> list[Fact]:
    """Complete (fact, counter, question) triples, by item number, in order. Items whose
    number is missing from any of the three lists are dropped."""
    return facts_of(section_triples(text))


def section_triples(text: str) -> list[tuple[str, ...]]:
    """(number, fact, counter, question), raw, of each number found in all three sections."""
    m = _SECTIONS.search(text)
    if not m:
        return []
    facts, counters, questions = (numbered(m.group(i)) for i in (1, 2, 3))
    return [
        (str(n), facts[n], counters[n], questions[n])
        for n in sorted(facts)
        if n in counters and n in questions
    ]


def facts_of(items: Sequence[tuple[str, ...]]) -> list[Fact]:
    """Facts from raw items: (number, fact, counter, question) from the sections, or
    (fact, counter, question) from JSON (numbered from 1 in order). The source is split
    off; a repeated fact, or one equal to its counter, is dropped."""
    out: list[Fact] = []
    seen: set[str] = set()
    for i, item in enumerate(items, 1):
        n, (raw_fact, raw_counter, question) = (
            (int(item[0]), item[1:]) if len(item) == 4 else (i, item)
        )
        fact, source = split_source(raw_fact)
        counter, _ = split_source(raw_counter)  # a source the model added anyway
        if not fact or not counter or fact in seen or fact == counter:
            continue
        seen.add(fact)
        out.append(Fact(n, fact, counter, question, source))
    return out


def wrap(text: str, question: str, source: str | None) -> str:
    lines = ["BEGININPUT", "BEGINCONTEXT"]
    if source:
        lines.append(f"url: {source}")
    lines += ["ENDCONTEXT", text, "ENDINPUT", "BEGININSTRUCTION", question, "ENDINSTRUCTION"]
    return "\n".join(lines)


class CounterfactualContextual(Instructor):
    name = "counterfactual_contextual"
    response_prompt_file = "counterfactual_contextual_response.txt"

    def __init__(self, ctx: Ctx) -> None:
        super().__init__(ctx)
        self.response_template = load_prompt(
            ctx.inst.response_prompt_path or self.response_prompt_file
        )

    def blocks(self, fact: Fact) -> tuple[str, str] | None:
        """The true and the counterfactual block of one fact, or None if either is not a
        valid closed-context block (a marker inside the text; no metadata at all, which
        ``valid_block`` does not accept)."""
        if any(_MARKER.search(t) for t in (fact.fact, fact.counter, fact.question)):
            # Checked here as well: valid_block lets a marker through at the start of a text.
            return None
        question = fact.question
        if fact.source and self.ctx.rng.random() < 0.5:
            question = f"{question} {self.ctx.rng.choice(SOURCE_REQUESTS)}"
        real = wrap(fact.fact, question, fact.source)
        fake = wrap(fact.counter, question, fact.source)
        if not (valid_block(real) and valid_block(fake)):
            return None
        return real, fake

    async def propose(self, task: GenerateBatch, stats: BatchStats) -> list[Candidate]:
        reply, found = await self.ask_shaped(
            render(self.prompt_template, **self.common_values(task)),
            replace(COUNTERFACTUALS, note=f"Write in {self.ctx.language}."),
            section_triples,
        )
        facts = self.usable(
            facts_of(found),
            reply,
            stats,
            texts=lambda f: (f.fact, f.question),
            limit=task.batch_size,
        )
        out: list[Candidate] = []
        for fact in facts:
            pair = self.blocks(fact)
            if pair is None:
                stats.filtered += 1
                continue
            out.append(Candidate(instruction=pair[0], meta={"counter": pair[1]}, counts=2))
        return out

    def response_prompt(self, block: str) -> str:
        return render(
            self.response_template,
            instruction=block,
            language=self.ctx.language,
            flesch=self.ctx.flesch,
        )

    async def respond(self, candidate: Candidate, stats: BatchStats) -> list[Item]:
        # Both versions, unless the count has room for one row only: then the true one
        # (so an odd count ends with a true row, never a falsified one alone).
        blocks = [candidate.instruction, str(candidate.meta["counter"])][: candidate.counts]
        answers = await asyncio.gather(
            *(self.ask(self.response_prompt(b)) for b in blocks), return_exceptions=True
        )
        # The pair is the lesson: both rows or neither.
        for a in answers:
            if isinstance(a, BaseException):
                raise a
        return [self.item(b, str(a)) for b, a in zip(blocks, answers, strict=True)]


COUNTERFACTUAL_INSTRUCTORS: list[type[Instructor]] = [CounterfactualContextual]
