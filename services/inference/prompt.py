"""Chat messages to a prompt: the airoboros format the experts were trained on, or the
tokenizer's chat template.

The airoboros format is the trainer's (``airoboros.trainer.data.build_prompt``), extended
to several turns the way the original LMoE server did (reference §4.2)::

    {system or "A chat."}\\nUSER: {u1}\\nASSISTANT: {a1}\\nUSER: {u2}\\nASSISTANT:

The tokens are BOS followed by that text tokenized without special tokens: exactly the
prompt half of a training example.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from airoboros.errors import InvalidRequest

DEFAULT_SYSTEM = "A chat."

#: ``prompt_format`` of the inference service ("template": older spelling of "chat-template")
PromptFormat = Literal["auto", "airoboros", "chat-template", "template"]

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class PromptTurn:
    """One message of a chat as the prompt is built from it (``developer`` is ``system``;
    content parts joined into one text)."""

    role: Role
    content: str


def check_turns(turns: Sequence[PromptTurn]) -> None:
    """Raise ``InvalidRequest`` unless the roles run ``[system] user (assistant user)*``."""
    if not turns:
        raise InvalidRequest("messages must not be empty", param="messages")
    body = list(turns)
    if body[0].role == "system":
        body = body[1:]
    if not body:
        raise InvalidRequest(
            "messages hold only a system message: add a user message after it",
            param="messages",
        )
    for i, turn in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn.role != expected:
            index = i + (len(turns) - len(body))
            where = "first after the system message" if i == 0 else f"at index {index}"
            if turn.role == "system":
                why = "a system message is allowed only first"
            else:
                why = f"expected a '{expected}' message {where}"
            raise InvalidRequest(
                f"messages[{index}] has role '{turn.role}': {why}; roles must run "
                "[system] user (assistant user)*, ending with a user message",
                param=f"messages[{index}].role",
            )
    if body[-1].role != "user":
        raise InvalidRequest(
            "the last message must be a user message (the assistant answers it)",
            param="messages",
        )


def airoboros_prompt(turns: Sequence[PromptTurn]) -> str:
    check_turns(turns)
    system = DEFAULT_SYSTEM
    body = list(turns)
    if body[0].role == "system":
        system = body[0].content or DEFAULT_SYSTEM
        body = body[1:]
    lines = [system]
    for turn in body:
        lines.append(("USER: " if turn.role == "user" else "ASSISTANT: ") + turn.content)
    return "\n".join(lines) + "\nASSISTANT: "


def has_template(tokenizer: Any | None) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def render_chat(
    turns: Sequence[PromptTurn],
    tokenizer: Any | None,
    mode: PromptFormat = "auto",
) -> tuple[str, bool]:
    """The prompt text for ``turns`` and whether BOS must be put in front of it.

    A chat template writes its own BOS (as text) when the model wants one; the airoboros
    format gets the tokenizer's BOS, as in training. ``"template"`` is the older spelling
    of ``"chat-template"``.
    """
    use_template = mode in ("chat-template", "template") or (
        mode == "auto" and has_template(tokenizer)
    )
    if not use_template:
        return airoboros_prompt(turns), True
    if not has_template(tokenizer):
        raise InvalidRequest(
            "prompt_format is 'chat-template' but the tokenizer has no chat template"
        )
    check_turns(turns)
    assert tokenizer is not None
    text = tokenizer.apply_chat_template(
        [{"role": t.role, "content": t.content} for t in turns],
        tokenize=False,
        add_generation_prompt=True,
    )
    return str(text), False
