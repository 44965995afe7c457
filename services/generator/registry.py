"""Which instructors exist, which are built, and how to make one."""

from __future__ import annotations

from airoboros.config import InstructorConfig
from airoboros.generator.instructors.base import Ctx, Instructor

#: Every category of the original tool (reference §1.2).
ALL_CATEGORIES = (
    "agent", "awareness", "card", "character", "coding", "contextual", "cot",
    "counterfactual_contextual", "detailed_writing", "editor", "experience", "general",
    "gtkm", "joke", "misconception", "multiple_choice", "orca", "plan", "riddle",
    "roleplay", "rp", "song", "stylized_response", "trivia", "wordgame", "writing",
)  # fmt: skip


def _implemented() -> dict[str, type[Instructor]]:
    from airoboros.generator.instructors.characters import CHARACTERS_INSTRUCTORS
    from airoboros.generator.instructors.contextual import Contextual
    from airoboros.generator.instructors.counterfactual import COUNTERFACTUAL_INSTRUCTORS
    from airoboros.generator.instructors.documents import DOCUMENTS_INSTRUCTORS
    from airoboros.generator.instructors.editor import EDITOR_INSTRUCTORS
    from airoboros.generator.instructors.inline import INLINE_INSTRUCTORS
    from airoboros.generator.instructors.longform import LONGFORM_INSTRUCTORS
    from airoboros.generator.instructors.simple import SIMPLE_INSTRUCTORS
    from airoboros.generator.instructors.tasks import TASK_INSTRUCTORS

    classes: list[type[Instructor]] = [
        *TASK_INSTRUCTORS,
        *INLINE_INSTRUCTORS,
        Contextual,
        *SIMPLE_INSTRUCTORS,
        *LONGFORM_INSTRUCTORS,
        *COUNTERFACTUAL_INSTRUCTORS,
        *DOCUMENTS_INSTRUCTORS,
        *EDITOR_INSTRUCTORS,
        *CHARACTERS_INSTRUCTORS,
    ]
    return {c.name: c for c in classes}


def known_instructors() -> set[str]:
    return set(ALL_CATEGORIES) | set(_implemented())


def implemented_instructors() -> dict[str, type[Instructor]]:
    return _implemented()


def validate_instructor(name: str, cfg: InstructorConfig) -> list[str]:
    cls = _implemented().get(name)
    return cls.validate(cfg) if cls else []


def create(name: str, ctx: Ctx) -> Instructor:
    return _implemented()[name](ctx)
