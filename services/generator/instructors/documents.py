"""The documents instructor: closed-context questions over the user's own documents (the
original's issue #12).

Passages come in ``GenerateBatch.inputs``, chosen on the planning side from the files that
airoboros.documents split (every passage once, in random order, before any repeats). This
side makes one LLM call per passage, concurrently, asking for ``QUESTION:``/``ANSWER:``/
``QUOTE:`` triples. A triple becomes a row only if it is grounded in the passage (see
``grounding_problem``): the quote must be found in the passage word for word (case,
punctuation and spacing aside), and the answer's numbers and most of its content words
must be found there too. The row's instruction is a BEGININPUT/BEGINCONTEXT block of the
``contextual`` format naming the source file; its response is the answer.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from dataclasses import dataclass, replace

from airoboros.contracts import BatchStats, Candidate, GenerateBatch
from airoboros.documents import (
    DEFAULT_ANSWER_SUPPORT,
    MARKERS,
    MIN_QUOTE_WORDS,
    Passage,
    passage_settings,
)
from airoboros.generator.instructors.base import Filtered, Instructor, count_loss, gather_candidates
from airoboros.generator.instructors.contextual import valid_block
from airoboros.generator.instructors.structured import DOCUMENT_QA
from airoboros.templates import render

log = logging.getLogger(__name__)


# --- parsing and grounding ------------------------------------------------------------


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    quote: str | None


_MARK = re.compile(r"[*_#>\s]*\b(QUESTION|ANSWER|QUOTE)\s*\d*\s*[*_]*\s*:[*_]*[ \t]*")


def parse_qa(text: str) -> list[QA]:
    """Triples from ``QUESTION: .. ANSWER: .. QUOTE: ..`` blocks (numbered or bold
    markers tolerated). A block without a question or an answer is skipped; a block
    without a quote keeps ``quote=None`` (and is rejected by grounding)."""
    out: list[QA] = []
    current: dict[str, str] = {}
    pieces = _MARK.split(text)
    # pieces: [before, KEY, value, KEY, value, ...]
    for i in range(1, len(pieces) - 1, 2):
        key, value = pieces[i], pieces[i + 1].strip()
        if key == "QUESTION":
            if current:
                out.append(_qa(current))
            current = {"QUESTION": value}
        elif current and key not in current:
            current[key] = value
    if current:
        out.append(_qa(current))
    return [qa for qa in out if qa.question and qa.answer]


def _qa(d: dict[str, str]) -> QA:
    quote = d.get("QUOTE")
    return QA(d.get("QUESTION", "").strip(), d.get("ANSWER", "").strip(), quote or None)


def normalize(text: str) -> str:
    """Casefolded words separated by single spaces: what two texts must share to count
    as the same wording (punctuation, quotes, dashes, case and spacing aside)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.findall(r"\w+", text))


_ELLIPSIS = re.compile(r"\.\.\.+|…|\[\s*\.\.\.\s*\]|\n")

_STOPWORDS = """a about above after again against all also am an and any are as at be because been
    before being below between both but by can could did do does doing down during each
    few for from further had has have having he her here hers herself him himself his how
    i if in into is it its itself just me more most my myself no nor not now of off on once
    only or other our ours out over own same she should so some such than that the their
    theirs them themselves then there these they this those through to too under until up
    very was we were what when where which while who whom why will with would you your
    yours yes one two three many much may might must shall upon within without among
    according passage text document documents source mentioned mentions mention states
    stated say says said described describes author writes written based answer question
    quote context section page"""
STOPWORDS = frozenset(_STOPWORDS.split())


def _stem(word: str) -> str:
    if len(word) > 3 and word.endswith("s"):
        word = word[:-1]
    return word[:5] if len(word) > 5 else word


def content_words(text: str) -> list[str]:
    return [
        w for w in normalize(text).split() if len(w) >= 3 and not w.isdigit() and w not in STOPWORDS
    ]


def grounding_problem(
    qa: QA, passage: str, *, support: float = DEFAULT_ANSWER_SUPPORT
) -> str | None:
    """Why this answer is not grounded in the passage, or None when it is.

    1. The quote (the model's verbatim evidence) must have at least ``MIN_QUOTE_WORDS``
       words and be found in the passage; fragments joined by "..." or line breaks must
       each be found. Words are compared after ``normalize``, so case, punctuation and
       spacing do not matter but every word and its order do.
    2. Every number in the answer must occur in the passage (invented figures are the
       commonest hallucination, and a word check alone would let them through).
    3. At least ``support`` of the answer's content words (stopwords and words of three
       letters or fewer left out; a plural "s" and endings past five letters ignored) must
       occur in the passage, so an answer cannot drift away from a real quote.
    """
    if not qa.quote:
        return "no quote"
    hay = f" {normalize(passage)} "
    quote = qa.quote.strip().strip("\"'“”‘’«»")
    fragments = [normalize(f) for f in _ELLIPSIS.split(quote)]
    fragments = [f for f in fragments if f]
    if sum(len(f.split()) for f in fragments) < MIN_QUOTE_WORDS:
        return "quote too short"
    for frag in fragments:
        if f" {frag} " not in hay:
            return "quote not in passage"
    passage_numbers = set(re.findall(r"\d+", hay))
    for number in re.findall(r"\d+", normalize(qa.answer)):
        if number not in passage_numbers:
            return f"number {number} not in passage"
    words = content_words(qa.answer)
    if words and support > 0:
        stems = {_stem(w) for w in hay.split()}
        found = sum(1 for w in words if _stem(w) in stems)
        if found / len(words) < support:
            return f"answer words not in passage ({found}/{len(words)})"
    return None


# --- the instructor ---------------------------------------------------------------------


class Documents(Instructor):
    """Questions, answers and BEGININPUT blocks from the passages of ``documents_path``."""

    name = "documents"
    prompt_file = "documents.txt"

    # --- step 1 -------------------------------------------------------------------------
    def prompt(self, passage: Passage, questions: int) -> str:
        extra = passage.context_lines()[1:]
        return render(
            self.prompt_template,
            source=passage.source,
            metadata=("\n" + "\n".join(extra)) if extra else "",
            passage=passage.text,
            question_count=questions,
            language=self.ctx.language,
            flesch=self.ctx.flesch,
        )

    async def _one(self, passage: Passage, stats: BatchStats) -> list[Candidate]:
        _, questions, support = passage_settings(self.ctx.inst)
        shape = replace(
            DOCUMENT_QA,
            note=f"Write the questions, answers and quotes in {self.ctx.language}.",
        )
        reply, found = await self.ask_shaped(
            self.prompt(passage, questions),
            shape,
            lambda text: [(q.question, q.answer, q.quote or "") for q in parse_qa(text)],
        )
        # Answers are filtered one by one below (reject_reason), with the grounding checks.
        triples = self.usable(
            [QA(q, a, quote or None) for q, a, quote in found],
            reply,
            stats,
            texts=lambda qa: (),
            apply_filters=False,
        )
        out: list[Candidate] = []
        for qa in triples[:questions]:
            reason = self.reject_reason(qa, passage, support)
            if reason:
                log.debug(
                    "%s: %s: rejected %r (%s)", self.name, passage.source, qa.question, reason
                )
                count_loss(stats, reason)
                continue
            assert qa.quote is not None
            out.append(
                Candidate(
                    instruction=passage.block(qa.question),
                    response=qa.answer,
                    # The question with its evidence, not with the whole passage: two
                    # questions over one 300-word passage embed as near-copies (cosine
                    # 0.97) and would be rejected as duplicates, while the same question
                    # over two passages has two different quotes.
                    dedupe_text=f"{qa.question}\n{qa.quote}",
                    meta={"source": passage.source, "index": passage.index},
                )
            )
        return out

    def reject_reason(self, qa: QA, passage: Passage, support: float) -> str | None:
        if MARKERS.search(qa.question) or MARKERS.search(qa.answer):
            return "markers in the question or answer"
        if not valid_block(passage.block(qa.question)):
            return "not a valid block"
        filtered = self._filter.reason(
            qa.answer, finish_reason=None, apply_filters=self.filter_responses
        )
        if filtered:
            return filtered
        return grounding_problem(qa, passage.text, support=support)

    async def propose(self, task: GenerateBatch, stats: BatchStats) -> list[Candidate]:
        inputs = task.inputs
        if not inputs:
            raise Filtered("no passages to work from")
        passages = [Passage.from_input(d) for d in inputs]
        return await gather_candidates([self._one(p, stats) for p in passages], stats)


DOCUMENTS_INSTRUCTORS: list[type[Instructor]] = [Documents]
