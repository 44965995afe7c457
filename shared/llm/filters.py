"""What makes a response unusable: cut off by length, a configured filter, a refusal."""

from __future__ import annotations

import re
from collections.abc import Sequence

#: Openings that mark a refusal or apology (the original's list, widened a little).
REFUSAL_OPENINGS = re.compile(
    r"^\s*(?:I'm sorry|I am sorry|Apologies|My apologies|I can't|I cannot|I won't|"
    r"I will not|I'm unable|I am unable|I'm not able|As an AI)\b",
    re.IGNORECASE,
)


class ResponseFilter:
    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = [re.compile(p, re.IGNORECASE) for p in patterns]

    def reason(
        self, text: str, *, finish_reason: str | None, apply_filters: bool = True
    ) -> str | None:
        """Why ``text`` must be dropped, or None if it is usable."""
        if finish_reason == "length":
            return "truncated"
        if not text or not text.strip():
            return "empty"
        if not apply_filters:
            return None
        if REFUSAL_OPENINGS.match(text):
            return "refusal"
        for p in self.patterns:
            if p.search(text):
                return f"filter:{p.pattern}"
        return None

    def item_reason(self, texts: Sequence[str], *, apply_filters: bool = True) -> str | None:
        """Why one item of a many-item answer (its instruction, answer, ...) must be
        dropped, or None: a refusal or a filter match drops that item only."""
        if texts and not any(t.strip() for t in texts):
            return "empty"
        if not apply_filters:
            return None
        for text in texts:
            if REFUSAL_OPENINGS.match(text):
                return "refusal"
        for p in self.patterns:
            for text in texts:
                if p.search(text):
                    return f"filter:{p.pattern}"
        return None
