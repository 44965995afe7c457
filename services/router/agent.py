"""Agent routing: ask the function-calling expert which expert should answer.

The ``function`` expert was trained on the agent instructor's rows (a request, a list of
available functions with descriptions, the chosen function as JSON or YAML). The router
presents the experts as those functions and reads the name back. Anything that goes wrong
(no such expert, no backend, a timeout, an answer naming no known expert) returns None and
the caller falls back to the embedding rule.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)

#: posts a chat completion body to a backend and returns the parsed JSON answer
Complete = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

_FUNCTION_KEY = re.compile(r"""["']?function["']?\s*[:=]\s*["']?([A-Za-z0-9_.\-]+)""")
_QUOTED = re.compile(r"""["']([A-Za-z0-9_.\-]+)["']""")


def agent_prompt(request_text: str, experts: Mapping[str, str]) -> str:
    """The instruction for the function expert: the request, then each expert as an
    available function (YAML, as in the agent training rows), then the answer format."""
    lines = [
        "Pick the one function below that is best suited to answer the user's request. "
        'Reply with JSON only, in the form {"function": "<name>"}.',
        "",
        f"Input: {request_text}",
        "",
        "Available functions:",
    ]
    for name, description in experts.items():
        lines.append(f"{name}:")
        lines.append(f"  description: {description or name}")
    return "\n".join(lines)


def parse_choice(answer: str, experts: Mapping[str, str] | list[str]) -> str | None:
    """The expert named in the function expert's answer: the value of a ``function`` key
    (JSON or YAML), else a quoted name, else the one expert named as a whole word; None if
    none (or several) of the known experts can be read from it."""
    names = list(experts)
    known = {n.lower(): n for n in names}
    for m in _FUNCTION_KEY.finditer(answer):
        if (hit := known.get(m.group(1).lower())) is not None:
            return hit
    for m in _QUOTED.finditer(answer):
        if (hit := known.get(m.group(1).lower())) is not None:
            return hit
    words = {w.lower() for w in re.findall(r"[A-Za-z0-9_.\-]+", answer)}
    found = [n for n in names if n.lower() in words]
    return found[0] if len(found) == 1 else None


class AgentRouter:
    """Chooses through ``complete`` (a chat completion on a backend) with ``expert``."""

    def __init__(
        self,
        complete: Complete,
        *,
        expert: str = "function",
        timeout: float = 10.0,
        max_tokens: int = 24,
    ) -> None:
        self.complete = complete
        self.expert = expert
        self.timeout = timeout
        self.max_tokens = max_tokens

    async def choose(self, request_text: str, experts: Mapping[str, str]) -> str | None:
        if self.expert not in experts or not experts:
            return None
        body = {
            "model": self.expert,
            "messages": [
                {"role": "system", "content": "A chat."},
                {"role": "user", "content": agent_prompt(request_text, experts)},
            ],
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
            "stream": False,
        }
        try:
            reply = await asyncio.wait_for(self.complete(body), self.timeout)
            text = str(reply["choices"][0]["message"]["content"] or "")
        except Exception as exc:  # any failure: the embedding rule decides instead
            log.warning(
                "agent routing failed (%s: %s); using the embedding rule", type(exc).__name__, exc
            )
            return None
        choice = parse_choice(text, experts)
        if choice is None:
            log.info("agent routing: no expert in the answer %s", json.dumps(text[:200]))
        return choice
