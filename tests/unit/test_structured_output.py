"""Structured output, unit level: the JSON shapes of the instructors' items, reading JSON
answers (whole, cut off, wrong), the prompts' format blocks, and the config key."""

from __future__ import annotations

import json
import re

import pytest

from airoboros.config import parse_config
from airoboros.errors import ConfigError
from airoboros.generator.instructors.base import (
    InlineInstructor,
    TaskListInstructor,
    load_prompt,
    parse_pairs,
)
from airoboros.generator.instructors.structured import TASKS, pairs
from airoboros.generator.registry import implemented_instructors
from airoboros.llm.structured import parse_json_items


def engines() -> list[tuple[str, type]]:
    out = []
    for name, cls in implemented_instructors().items():
        if cls.propose is TaskListInstructor.propose or cls.propose is InlineInstructor.propose:
            out.append((name, cls))
    return out


def test_the_two_engines_cover_sixteen_instructors() -> None:
    assert len(engines()) == 16


@pytest.mark.parametrize("name, cls", engines())
def test_every_engine_prompt_gets_the_json_shape_instead_of_markers(name: str, cls: type) -> None:
    text = load_prompt(cls.prompt_file or f"{name}.txt")
    if cls.propose is TaskListInstructor.propose:
        shape = TASKS
    else:
        shape = pairs(cls.start_key, cls.end_key)
    out = shape.prompt(text)
    assert "never translate" not in out  # the marker block is gone, not just appended to
    assert f'{{"{shape.key}": [{{"' in out
    assert all(f'"{f}"' in out for f in shape.fields)
    # What the prompt said each marker holds is kept as the field's description.
    block = text[text.index("Format") :]
    for field in shape.fields:
        said = re.search(rf"(?m)^{field.upper()}:[ \t]*(.+?)[ \t]*$", block)
        if said:
            assert json.dumps(f"<{said.group(1)}>", ensure_ascii=False) in out
    # The rest of the prompt is untouched.
    head = text[: text.index("Format")]
    assert out.startswith(head)


def test_a_prompt_without_a_format_block_gets_the_shape_appended() -> None:
    out = TASKS.prompt("Write three tasks about otters.")
    assert out.startswith("Write three tasks about otters.\n\nFormat: one JSON object")
    assert '{"tasks": [{"instruction": "<the task>"}, ...]}' in out


def test_schema_is_openai_strict() -> None:
    schema = pairs("QUESTION", "ANSWER").schema()
    item = schema["properties"]["items"]["items"]
    assert item["required"] == ["question", "answer"]
    assert item["additionalProperties"] is False and schema["additionalProperties"] is False
    fmt = TASKS.response_format()
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True


def test_whole_json_gives_every_complete_item_in_order() -> None:
    text = json.dumps(
        {
            "items": [
                {"question": " Q1 ", "answer": "A1"},
                {"question": "Q2", "answer": ""},  # empty: skipped as the marker parser does
                {"question": "Q3"},  # missing field: skipped
                "not an object",
                {"question": "Q4", "answer": 4},  # not a string: skipped
                {"question": "Q5", "answer": "A5"},
            ]
        }
    )
    items, whole = parse_json_items(text, "items", ("question", "answer"))
    assert whole and items == [("Q1", "A1"), ("Q5", "A5")]
    # The same pairs as the marker format gives for the same content.
    markers = "QUESTION: Q1\nANSWER: A1\n\nQUESTION: Q5\nANSWER: A5"
    assert items == parse_pairs(markers)


def test_json_cut_by_the_token_limit_keeps_its_complete_items() -> None:
    text = '{"tasks": [{"instruction": "one"}, {"instruction": "two"}, {"instruction": "thr'
    assert TASKS.parse(text, truncated=True) == [("one",), ("two",)]
    # Not cut off: invalid JSON is unparseable, as a reply without markers is.
    assert TASKS.parse(text, truncated=False) == []


@pytest.mark.parametrize(
    "text",
    ["", "Sure! Here are tasks: TSK 1. one", '{"task": [{"instruction": "x"}]}', "[1, 2]", "{"],
)
def test_wrong_answers_give_no_items(text: str) -> None:
    assert TASKS.parse(text, truncated=False) == []


def test_config_key_top_level_and_per_instructor() -> None:
    cfg = parse_config(
        {
            "structured_output": "off",
            "instructors": {"general": {"structured_output": "json_schema"}, "riddle": {}},
        }
    )
    assert cfg.structured_output_for("general") == "json_schema"
    assert cfg.structured_output_for("riddle") == "off"
    assert parse_config({}).structured_output == "auto"
    with pytest.raises(ConfigError) as info:
        parse_config({"structured_output": "yes"})
    assert "structured_output" in str(info.value)


def test_json_schema_needs_the_chat_api() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(
            {"api": "completions", "instructors": {"general": {"structured_output": "json_schema"}}}
        )
    assert "instructors.general.structured_output" in str(info.value)
    # auto with the completions API is fine: it uses the markers.
    parse_config({"api": "completions", "structured_output": "auto"})


async def test_probe_verdicts_per_endpoint_and_model() -> None:
    """A server that honours the format, one that refuses it, one that ignores it: one
    probe each, remembered per (base_url, model)."""
    from dataclasses import dataclass

    from airoboros.errors import BadRequestError, ServerError
    from airoboros.llm.structured import StructuredSupport, forget_verdicts

    @dataclass
    class Settings:
        base_url: str
        api: str = "chat"

    @dataclass
    class Reply:
        text: str

    class Client:
        def __init__(self, url: str, answer: object) -> None:
            self.settings = Settings(url)
            self.answer = answer
            self.calls: list[dict[str, object]] = []

        async def complete(self, messages: object, **kw: object) -> Reply:
            self.calls.append(kw)
            if isinstance(self.answer, Exception):
                raise self.answer
            return Reply(str(self.answer))

    forget_verdicts()
    try:
        cases = {
            "http://json": ('{"ok": true}', True),
            "http://refuses": (BadRequestError("unsupported response_format", status=400), False),
            "http://ignores": ("Hello! How can I help?", False),
        }
        for url, (answer, verdict) in cases.items():
            client = Client(url, answer)
            support = StructuredSupport(client)
            assert await support.use_structured("auto", "m", "general") is verdict
            assert await support.use_structured("auto", "m", "general") is verdict
            assert support.probes == 1 and len(client.calls) == 1
            params = client.calls[0]["params"]
            assert isinstance(params, dict) and params["response_format"]["type"] == "json_schema"
            # Another client of the same endpoint and model reuses the verdict.
            other = StructuredSupport(Client(url, answer))
            assert await other.use_structured("auto", "m", "general") is verdict
            assert other.probes == 0
            assert await support.use_structured("off", "m", "general") is False
            assert await support.use_structured("json_schema", "m", "general") is True
        # A transient failure decides nothing: no verdict, markers for now, probe again.
        flaky = StructuredSupport(Client("http://flaky", ServerError("502", status=502)))
        assert await flaky.use_structured("auto", "m", "general") is False
        assert await flaky.use_structured("auto", "m", "general") is False
        assert flaky.probes == 2
        # json_schema over the completions API is a config error.
        completions = Client("http://c", "{}")
        completions.settings.api = "completions"
        with pytest.raises(ConfigError):
            await StructuredSupport(completions).use_structured("json_schema", "m", "general")
        assert await StructuredSupport(completions).use_structured("auto", "m", "g") is False
    finally:
        forget_verdicts()


@pytest.mark.parametrize(
    "prompt_file, shape_name",
    [
        ("documents.txt", "DOCUMENT_QA"),
        ("gtkm.txt", "GTKM_QUESTIONS"),
        ("awareness_temporal.txt", "AWARENESS_WITH_CONTEXT"),
        ("awareness_location.txt", "AWARENESS_WITH_CONTEXT"),
        ("awareness_character.txt", "AWARENESS_CHARACTER"),
        ("counterfactual_contextual.txt", "COUNTERFACTUALS"),
        ("character.txt", "CHARACTERS"),
    ],
)
def test_the_instructors_own_shapes_replace_their_layout(prompt_file: str, shape_name: str) -> None:
    from airoboros.generator.instructors import structured

    shape = getattr(structured, shape_name)
    text = load_prompt(prompt_file)
    out = shape.prompt(text)
    assert "untranslated" not in out and "never translate" not in out
    assert out.count("Format: one JSON object") == 1
    assert all(f'"{f}": "<' in out for f in shape.fields)
    # Not appended: the layout was found and replaced in place.
    assert len(out) - len(text) < 400


def test_counterfactual_json_items_become_the_same_facts_as_sections() -> None:
    from airoboros.generator.instructors.counterfactual import facts_of, parse_counterfactual

    sections = (
        "FACTS:\n1. Prague's bridge opened in 1402. [source: https://en.wikipedia.org/wiki/X]\n"
        "2. Oslo is in Norway. [source: https://en.wikipedia.org/wiki/Y]\n\n"
        "COUNTER:\n1. Prague's bridge opened in 1502.\n2. Oslo is in Norway.\n\n"
        "QUESTIONS:\n1. When did the bridge open?\n2. Where is Oslo?\n"
    )
    as_json = json.dumps(
        {
            "items": [
                {
                    "fact": "Prague's bridge opened in 1402. [source: https://en.wikipedia.org/wiki/X]",
                    "counter": "Prague's bridge opened in 1502.",
                    "question": "When did the bridge open?",
                },
                {  # the counter equals the fact: dropped, as from the sections
                    "fact": "Oslo is in Norway. [source: https://en.wikipedia.org/wiki/Y]",
                    "counter": "Oslo is in Norway.",
                    "question": "Where is Oslo?",
                },
            ]
        }
    )
    from airoboros.generator.instructors.structured import COUNTERFACTUALS

    from_json = facts_of(COUNTERFACTUALS.parse(as_json, truncated=False))
    assert from_json == parse_counterfactual(sections)
    assert len(from_json) == 1 and from_json[0].source == "https://en.wikipedia.org/wiki/X"
