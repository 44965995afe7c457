"""Prompt templates: ``{name}`` placeholders, and nothing else, filled."""

from __future__ import annotations

import re
from typing import Any

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def render(template: str, **values: Any) -> str:
    """Fill ``{name}`` placeholders that have a value; leave every other brace alone
    (prompts may contain JSON or code examples)."""
    return _PLACEHOLDER.sub(
        lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0), template
    )
