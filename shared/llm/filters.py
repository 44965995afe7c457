"""What makes a response unusable: cut off by length, a configured filter, a refusal.

``response_filters`` come from configs, which the services take from strangers: they are
compiled with RE2 (google-re2), whose matching time is linear in the text whatever the
pattern, so no filter can hang a worker (Python's ``re`` backtracks: ``(\\w+\\s?)*!`` takes
exponential time). RE2 has no lookarounds or backreferences; a filter using them is
refused when the config is validated, naming it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import re2

#: Openings that mark a refusal or apology (the original's list, widened a little).
REFUSAL_OPENINGS = re.compile(
    r"^\s*(?:I'm sorry|I am sorry|Apologies|My apologies|I can't|I cannot|I won't|"
    r"I will not|I'm unable|I am unable|I'm not able|As an AI)\b",
    re.IGNORECASE,
)


def _options() -> Any:
    options = re2.Options()
    options.case_sensitive = False
    options.log_errors = False  # the error is raised (and reported) instead
    return options


_RE2_OPTIONS = _options()


def compile_filter(pattern: str) -> Any:
    """A response filter, case-insensitive, in RE2. Raises ValueError saying why a
    pattern cannot be used (invalid, or a feature RE2 leaves out for speed)."""
    try:
        return re2.compile(pattern, options=_RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc
        raise ValueError(
            f"not a usable regular expression ({reason}); filters are matched with RE2, "
            "which has no lookarounds or backreferences and takes linear time"
        ) from None


class ResponseFilter:
    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = [compile_filter(p) for p in patterns]

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
