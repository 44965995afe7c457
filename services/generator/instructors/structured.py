"""The JSON shapes of the instructors' items, for endpoints with structured output.

Where the endpoint honours ``response_format`` (``structured_output``: see
airoboros.llm.structured), an instructor asks for its items as one JSON object of a
declared shape instead of a marker format, and reads them into the same tuples its
marker parser gives, so counting, dedupe and filters are unchanged:

* task lists (``TSK n.``): ``{"tasks": [{"instruction": "..."}, ...]}``
* pairs (``QUESTION:``/``ANSWER:``, ``PROMPT:``/``ANSWER:``): ``{"items": [{"question":
  "...", "answer": "..."}, ...]}``, the fields named after the instructor's markers.

The prompt's marker-format block (from its ``Format...`` line through the line that says
the markers are never translated) is replaced by a short description of the JSON shape;
a prompt without such a block (a user's own) gets the description appended.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from airoboros.errors import BadRequestError
from airoboros.llm.structured import json_schema_format, parse_json_items

#: The marker-format block of the packaged prompts: "Format: only the numbered list ..."
#: or "Format each item exactly like this:" through '"X" ... never translate it/them.'
FORMAT_BLOCK = r"(?ms)^Format\b.*?never translate (?:it|them)\.[ \t]*$"
_FORMAT_BLOCK = re.compile(FORMAT_BLOCK)
_MARKER_LINE = re.compile(r"(?m)^[ \t]*([A-Z]+):[ \t]*(.+?)[ \t]*$")


class StructuredOutputRefused(BadRequestError):
    """``structured_output: json_schema`` and the endpoint refused ``response_format``:
    no call of the job can succeed as configured."""

    code = "structured_output_unsupported"


@dataclass(frozen=True)
class ItemShape:
    """One instructor's items as JSON: ``{key: [{field: string, ...}, ...]}``."""

    key: str
    fields: tuple[str, ...]
    #: what each field holds, when the prompt does not say (same order as ``fields``)
    descriptions: tuple[str, ...]
    #: the prompt's marker-format block (a regex), replaced by the JSON shape
    block: str = FORMAT_BLOCK
    #: said after the shape (what the replaced block said besides the format)
    note: str = ""
    #: describe the fields with ``descriptions`` even where the prompt's block says what
    #: its markers hold (when the markers do not map one to one onto the fields)
    own_descriptions: bool = False

    def schema(self) -> dict[str, Any]:
        item = {
            "type": "object",
            "properties": {f: {"type": "string"} for f in self.fields},
            "required": list(self.fields),
            "additionalProperties": False,
        }
        return {
            "type": "object",
            "properties": {self.key: {"type": "array", "items": item}},
            "required": [self.key],
            "additionalProperties": False,
        }

    def response_format(self) -> dict[str, Any]:
        return json_schema_format(self.key, self.schema())

    def prompt(self, prompt: str) -> str:
        """``prompt`` with its marker-format block replaced by the JSON shape."""
        block = re.search(self.block, prompt)
        said = dict(_MARKER_LINE.findall(block.group(0))) if block else {}
        if self.own_descriptions:
            said = {}
        example = {
            self.key: [
                {
                    f: f"<{said.get(f.upper(), d)}>"
                    for f, d in zip(self.fields, self.descriptions, strict=True)
                }
            ]
        }
        shape = json.dumps(example, ensure_ascii=False)[:-2] + ", ...]}"
        text = (
            "Format: one JSON object and nothing else, of this shape (one element of "
            f'"{self.key}" per item):\n{shape}'
        )
        if self.note:
            text += "\n" + self.note
        if block is None:
            return prompt.rstrip() + "\n\n" + text
        return prompt[: block.start()] + text + prompt[block.end() :]

    def parse(self, text: str, truncated: bool) -> list[tuple[str, ...]]:
        """The items of a JSON answer; an answer that is not whole JSON gives none unless
        it was cut off by the token limit (then its complete items count)."""
        items, whole = parse_json_items(text, self.key, self.fields)
        return items if whole or truncated else []


TASKS = ItemShape("tasks", ("instruction",), ("the task",))
#: documents: a question over a passage, its answer, and the quote that supports it
DOCUMENT_QA = ItemShape(
    "questions",
    ("question", "answer", "quote"),
    ("the question", "the answer", "the exact words from the passage"),
    block=r"(?ms)^Use exactly this layout.*?never translate them\.[ \t]*$",
)


#: gtkm: questions to a character, one per item
GTKM_QUESTIONS = ItemShape(
    "questions",
    ("question",),
    ("a question",),
    block=r"(?m)^Write in .*keep the marker QUESTION: untranslated\..*$",
)
_AWARENESS_BLOCK = r"(?m)^Write in .*keeping the markers .*untranslated.*$"
#: awareness, location and time variants: the question, the situation, the answer without
#: it and the answer with it
AWARENESS_WITH_CONTEXT = ItemShape(
    "items",
    ("question", "context", "answer", "contextualanswer"),
    ("the question", "the context", "the answer without the context", "the answer with it"),
    block=_AWARENESS_BLOCK,
)
#: awareness, character variant: the assistant's answer and the character's
AWARENESS_CHARACTER = ItemShape(
    "items",
    ("question", "answer", "contextualanswer"),
    ("the question", "the assistant's answer", "the character's answer"),
    block=_AWARENESS_BLOCK,
)


#: counterfactual_contextual: a true passage, its falsified copy, and a question on what
#: differs (the prompt's three numbered sections become one list of items)
COUNTERFACTUALS = ItemShape(
    "items",
    ("fact", "counter", "question"),
    (
        "3 or 4 sentences of true facts about a famous or influential person, place, "
        "discovery or historical event, ending with its source in square brackets, like "
        "[source: https://en.wikipedia.org/wiki/Page_name]",
        "the same passage with its key facts (names, dates, numbers, places) wrong but "
        "plausible, a sentence or two of related detail added, and no source",
        "one simple question about a detail that differs between the two versions, not answered",
    ),
    block=r"(?ms)^Write three sections.*?never translate them\.[ \t]*$",
)


#: character: a role-play card (its NAME: line is made from "name" when read)
CHARACTERS = ItemShape(
    "characters",
    ("name", "description", "guide"),
    (
        "the character's name",
        "one paragraph describing the character",
        "one or two sentences telling an actor how to stay in this character when "
        "replying (tone, vocabulary, quirks)",
    ),
    block=r"(?ms)^Write everything in .*?keep the markers .*?^Write nothing else.*?$",
    own_descriptions=True,
)


def pairs(start_key: str, end_key: str) -> ItemShape:
    """The shape of an instructor's ``START:``/``END:`` pairs."""
    return ItemShape("items", (start_key.lower(), end_key.lower()), ("the request", "the answer"))


def as_pairs(items: Sequence[tuple[str, ...]]) -> list[tuple[str, str]]:
    return [(i[0], i[1]) for i in items]
