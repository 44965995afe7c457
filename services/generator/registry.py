"""The instructor classes of the generator, by category, and how to make one.

What each category is (phase, topics, dedupe scope, the material its batches carry, its
config checks) is declared in airoboros.catalog, which the planning side reads; this is
the code that runs it.
"""

from __future__ import annotations

from airoboros.generator.instructors.base import Ctx, Instructor


def implemented_instructors() -> dict[str, type[Instructor]]:
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


def create(name: str, ctx: Ctx) -> Instructor:
    return implemented_instructors()[name](ctx)
