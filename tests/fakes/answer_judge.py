"""Answers the cull judge (services/topics/cull/judge.txt) for the scripted server.

Deterministic from the row: BAD when the reply contains ``BADANSWER``, a reply that is
neither word when it contains ``JUDGEGARBLE``, GOOD otherwise.
"""

from __future__ import annotations

import re
from typing import Any

#: A phrase only the judge prompt has.
MARKER = "Answer with exactly one word, GOOD or BAD"
BAD = "BADANSWER"
GARBLE = "JUDGEGARBLE"
_REPLY = re.compile(r"<reply>\n(.*)\n</reply>", re.S)


def answer(llm: Any, prompt: str, messages: list[dict[str, Any]]) -> str | None:
    if MARKER not in prompt:
        return None
    m = _REPLY.search(prompt)
    reply = m.group(1) if m else prompt
    if GARBLE in reply:
        return "I cannot decide."
    return "BAD" if BAD in reply else "GOOD"
