"""Scripted answers to the ``documents`` prompt (questions over a passage of the user's
documents).

Answers are built from the passage's own sentences, so they are grounded: the quote is a
sentence of the passage and the answer restates it. Every third question (counted over
the server's life, so deterministic for a given run order) is ungrounded on purpose,
alternating between two kinds the instructor must reject:

* an invented answer with an invented quote (the quote is not in the passage);
* an invented answer with a real quote (the quote checks out, the answer does not).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.fakes.llm_server import ScriptedLLM

_PASSAGE = re.compile(r"<passage>\n(.*?)\n</passage>", re.S)
_COUNT = re.compile(r"Write (\d+) questions")
#: what the invented answers say: words and figures that no test document contains
INVENTED = (
    "The zeppelin consortium of Quillford auctioned {n} brass orreries to the Vexmoor "
    "guild in {year}, after a quarrel with the Ostrava glassworks."
)
#: the grounded answers start so; tests strip it to find the rest in the passage
GROUNDED_PREFIX = "From the passage: "


def sentences(passage: str) -> list[str]:
    text = " ".join(passage.split())
    parts = re.split(r"(?<=[.!?])\s+", text)
    return [p for p in parts if len(p.split()) >= 5]


def answer(llm: ScriptedLLM, prompt: str, messages: list[dict[str, Any]]) -> str | None:
    m = _PASSAGE.search(prompt)
    if not m or "QUOTE:" not in prompt:
        return None
    passage = m.group(1)
    count_match = _COUNT.search(prompt)
    count = int(count_match.group(1)) if count_match else 2
    found = sentences(passage) or [" ".join(passage.split()[:12])]
    rng = llm.rng
    picks = rng.sample(found, min(count, len(found)))
    blocks = []
    for sentence in picks:
        n = llm.stats["documents_questions"]
        llm.stats["documents_questions"] += 1
        lead = " ".join(sentence.split()[:4]).rstrip(".,;:!?")
        question = f"What does the document say about {lead!r}?"
        if n % 3 == 2:
            invented = INVENTED.format(n=rng.randint(100, 999), year=rng.randint(1700, 1799))
            llm.stats["documents_ungrounded"] += 1
            quote = invented if (n // 3) % 2 == 0 else sentence
            blocks.append(f"QUESTION: {question}\nANSWER: {invented}\nQUOTE: {quote}")
        else:
            blocks.append(
                f"QUESTION: {question}\nANSWER: {GROUNDED_PREFIX}{sentence}\nQUOTE: {sentence}"
            )
    return "\n\n".join(blocks)
