"""Closed-context questions over invented texts (BEGININPUT ... ENDINSTRUCTION blocks)."""

from __future__ import annotations

import re
from typing import Any

from airoboros.contracts import BatchStats, Candidate, GenerateBatch
from airoboros.generator.instructors.base import Filtered, TaskListInstructor, gather_candidates
from airoboros.templates import render

# A body is any text that does not itself contain a marker (so a missing ENDCONTEXT or
# ENDINPUT cannot be papered over by the next block's markers).
_BODY = r"(?:(?!BEGININPUT|ENDINPUT|BEGINCONTEXT|ENDCONTEXT|BEGININSTRUCTION|ENDINSTRUCTION).)"
VALID_BLOCK = re.compile(
    rf"^\s*(?:BEGININPUT\s*\n\s*BEGINCONTEXT\s*\n{_BODY}*?\n\s*ENDCONTEXT\s*\n{_BODY}*?\S{_BODY}*?\n\s*ENDINPUT\s*\n\s*)+"
    rf"BEGININSTRUCTION\s*\n{_BODY}*?\S{_BODY}*?\n?\s*ENDINSTRUCTION\s*$",
    re.S,
)

DEFAULT_CONTEXT_STYLES = [
    "news article", "blog post", "slack conversation", "text messages", "fictional short story",
    "video transcript", "song", "poem", "scientific study", "medical report", "reddit post",
    "jira ticket", "github merge request", "gitlab issue", "email", "encyclopedia entry",
    "technical documentation",
]  # fmt: skip

DEFAULT_FORMATTING = [
    "JSON", "YAML", "CSV", "markdown", "markdown table", "bullet list",
    "numbered list", "python dict", "php associative array", "XML",
]  # fmt: skip

SOURCE_REQUESTS = [
    " Ask for the source (from the metadata) of the answer.",
    " Ask for references, taken from the metadata.",
]


def valid_block(text: str) -> bool:
    return bool(VALID_BLOCK.match(text))


class Contextual(TaskListInstructor):
    """Step 1 makes ``batch_size`` exercises in parallel (one call each); step 2 answers
    each accepted exercise with the contextual response prompt."""

    name = "contextual"
    response_prompt_file = "contextual_response.txt"
    topic_label = "Text"

    def _values(self, topic: str | None) -> dict[str, Any]:
        rng = self.ctx.rng
        styles = self.ctx.inst.extra("context_styles") or DEFAULT_CONTEXT_STYLES
        formats = self.ctx.inst.extra("formatting_options") or DEFAULT_FORMATTING
        input_count = rng.choices([1, 2, 3, 4], weights=[0.55, 0.25, 0.15, 0.05])[0]
        task_count = rng.choices([1, 2, 3], weights=[0.5, 0.35, 0.15])[0]
        target = ""
        if input_count > 1:
            target = "Some instructions should need details from only one of the texts. "
        format_task = ""
        if rng.random() < 0.3:
            format_task = f"One instruction should ask for the answer as {rng.choice(formats)}. "
        include_source = rng.choice(SOURCE_REQUESTS) if rng.random() < 0.3 else ""
        topics = f'- The texts should relate to the topic: "{topic}"' if topic else ""
        return {
            "input_count": input_count,
            "task_count": task_count,
            "styles": ", ".join(rng.sample(styles, min(len(styles), 3))),
            "target_selection": target,
            "format_task": format_task,
            "include_source": include_source,
            "topics": topics,
            "language": self.ctx.language,
            "flesch": self.ctx.flesch,
            "topic_avoidance": self.ctx.topic_avoidance,
        }

    async def _one(self, topic: str | None, stats: BatchStats) -> Candidate | None:
        try:
            text = await self.ask(render(self.prompt_template, **self._values(topic)))
        except Filtered as f:
            f.count(stats)
            return None
        text = text.strip()
        if not valid_block(text):
            stats.unparseable += 1
            return None
        return Candidate(instruction=text)

    async def propose(self, task: GenerateBatch, stats: BatchStats) -> list[Candidate]:
        topics: list[str | None] = list(task.topics) or [None] * task.batch_size
        return await gather_candidates(
            [self._one(t, stats) for t in topics[: task.batch_size]], stats
        )
