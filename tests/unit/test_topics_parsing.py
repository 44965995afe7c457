"""Parsing of LLM answers (topics, tasks, pairs, contextual blocks), topic picking,
and the JSONL sink's crash recovery."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from airoboros.config import parse_config
from airoboros.contracts import Item
from airoboros.errors import ConfigError
from airoboros.generator.instructors.base import parse_pairs, parse_tasks
from airoboros.generator.instructors.contextual import valid_block
from airoboros.store import SqlStore
from airoboros.templates import render
from airoboros.topics.sink import JsonlSink
from airoboros.topics.topics import (
    TopicPicker,
    instructor_topics,
    parse_numbered_list,
    read_topics_file,
    unique,
)

# --- topics ------------------------------------------------------------------------------


def test_parse_numbered_list() -> None:
    text = (
        "Here are some topics:\n"
        "\n"
        "1. **Science:**\n"
        "2. Ancient Rome\n"
        "3) **Quantum computing**\n"
        "4.   _Jazz music_   \n"
        "\n"
        "5. `Rust`\n"
        "6. Categories:\n"
        "7.    \n"
        "- not numbered\n"
        "12. Origami\n"
    )
    assert parse_numbered_list(text) == [
        "Ancient Rome",
        "Quantum computing",
        "Jazz music",
        "Rust",
        "Origami",
    ]


def test_parse_numbered_list_of_prose_is_empty() -> None:
    assert parse_numbered_list("I'm sorry, I can't list topics.\n\n") == []


def test_unique_is_case_insensitive_and_keeps_first_spelling() -> None:
    assert unique(["Rome", "rome ", " ROME", "Paris", "", "  ", "paris", "Berlin"]) == [
        "Rome",
        "Paris",
        "Berlin",
    ]


def test_read_topics_file_skips_blanks_and_duplicates(tmp_path: Path) -> None:
    p = tmp_path / "topics.txt"
    p.write_text("Rome\n\nParis\nrome\n  \nBerlin\n", encoding="utf-8")
    assert read_topics_file(p) == ["Rome", "Paris", "Berlin"]


def test_topic_picker_rotates_from_a_random_start() -> None:
    topics = ["a", "b", "c", "d"]
    picker = TopicPicker(topics, "rotate", random.Random(7))
    taken = picker.take(3) + picker.take(3) + picker.take(2)
    start = topics.index(taken[0])
    assert taken == [topics[(start + i) % 4] for i in range(8)]
    # Every topic is used before any is used twice.
    assert sorted(taken[:4]) == topics


def test_topic_picker_start_depends_on_rng() -> None:
    starts = {
        TopicPicker(list("abcdefgh"), "rotate", random.Random(s)).take(1)[0] for s in range(30)
    }
    assert len(starts) > 1


def test_topic_picker_sample_mode() -> None:
    topics = ["a", "b", "c", "d", "e"]
    picker = TopicPicker(topics, "sample", random.Random(3))
    few = picker.take(3)
    assert len(few) == 3
    assert len(set(few)) == 3  # without replacement when possible
    assert set(few) <= set(topics)
    many = picker.take(12)
    assert len(many) == 12
    assert set(many) <= set(topics)


def test_topic_picker_edge_cases() -> None:
    assert TopicPicker([], "rotate", random.Random(0)).take(3) == []
    assert TopicPicker(["a"], "rotate", random.Random(0)).take(0) == []
    assert TopicPicker(["a"], "rotate", random.Random(0)).take(3) == ["a", "a", "a"]


def test_instructor_topics(tmp_path: Path) -> None:
    own = tmp_path / "own.txt"
    own.write_text("Chess\nchess\nGo\n", encoding="utf-8")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    missing = tmp_path / "missing.txt"
    cfg = parse_config(
        {
            "instructors": {
                "general": {},
                "writing": {"topics_path": str(own)},
                "trivia": {"topics_path": str(missing)},
                "joke": {"topics_path": str(empty)},
            }
        }
    )
    assert instructor_topics(cfg, "general", ["default"]) == ["default"]
    assert instructor_topics(cfg, "writing", ["default"]) == ["Chess", "Go"]

    with pytest.raises(ConfigError) as info:
        instructor_topics(cfg, "trivia", ["default"])
    assert info.value.problems[0].startswith("instructors.trivia.topics_path:")
    assert "not found" in info.value.problems[0]

    with pytest.raises(ConfigError) as info:
        instructor_topics(cfg, "joke", ["default"])
    assert info.value.problems[0].startswith("instructors.joke.topics_path:")
    assert "empty" in info.value.problems[0]


# --- instructor parsing -------------------------------------------------------------------


def test_parse_tasks_is_tolerant() -> None:
    text = (
        "Sure! Here are the tasks:\n"
        "TSK 1. Write a poem about cats.\n"
        "TSK 2: Explain\nrecursion in detail.\n"
        "  TSK3) Summarize a book.\n"
        "TSK 4.\nTranslate 'hello' to French.\n"
        "TSK 5.Name three rivers."
    )
    assert parse_tasks(text) == [
        "Write a poem about cats.",
        "Explain\nrecursion in detail.",
        "Summarize a book.",
        "Translate 'hello' to French.",
        "Name three rivers.",
    ]


def test_parse_tasks_empty_task_does_not_swallow_the_next() -> None:
    assert parse_tasks("TSK 1. a\nTSK 2.\nTSK 3. c") == ["a", "c"]


def test_parse_tasks_without_markers_is_empty() -> None:
    assert parse_tasks("I cannot produce tasks today.") == []


def test_parse_pairs_question_answer() -> None:
    text = (
        "QUESTION: What is 2+2?\nANSWER: 4\n\n"
        "QUESTION: What is the capital of France?\nANSWER: Paris.\nIt is on the Seine.\n"
        "QUESTION: unanswered\nANSWER:"
    )
    assert parse_pairs(text) == [
        ("What is 2+2?", "4"),
        ("What is the capital of France?", "Paris.\nIt is on the Seine."),
    ]


def test_parse_pairs_prompt_answer() -> None:
    text = "PROMPT: Say hi\nANSWER: hi\nPROMPT: Count to three\nANSWER: 1 2 3"
    assert parse_pairs(text, "PROMPT", "ANSWER") == [("Say hi", "hi"), ("Count to three", "1 2 3")]
    assert parse_pairs(text) == []  # different markers


def test_render_fills_known_and_leaves_other_braces() -> None:
    template = 'Reply as JSON: {"answer": "..."} in {language}; keep {unknown} and {{x}} and {}.'
    assert render(template, language="French", batch_size=3) == (
        'Reply as JSON: {"answer": "..."} in French; keep {unknown} and {{x}} and {}.'
    )
    assert render("{n} tasks, {n} times", n=5) == "5 tasks, 5 times"


ONE_INPUT = """BEGININPUT
BEGINCONTEXT
date: 2021-04-01
author: Jane Doe
ENDCONTEXT
The city council approved the new park on Tuesday.
ENDINPUT
BEGININSTRUCTION
When was the park approved? Cite your source.
ENDINSTRUCTION"""

TWO_INPUTS = """BEGININPUT
BEGINCONTEXT
url: https://example.com/a
ENDCONTEXT
Text number one.
ENDINPUT
BEGININPUT
BEGINCONTEXT
url: https://example.com/b
ENDCONTEXT
Text number two,
over two lines.
ENDINPUT
BEGININSTRUCTION
Compare the two texts.
What do they share?
ENDINSTRUCTION
"""


def test_valid_block_accepts_well_formed_blocks() -> None:
    assert valid_block(ONE_INPUT)
    assert valid_block(TWO_INPUTS)
    assert valid_block("\n  " + ONE_INPUT + "\n\n")


def test_valid_block_rejects_missing_endcontext() -> None:
    assert not valid_block(ONE_INPUT.replace("ENDCONTEXT\n", ""))
    assert not valid_block(TWO_INPUTS.replace("ENDCONTEXT\n", ""))


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("ENDCONTEXT\nText number two", "Text number two"),
        ("Text number one.\nENDINPUT\n", "Text number one.\n"),
    ],
)
def test_valid_block_rejects_a_broken_second_input(old: str, new: str) -> None:
    broken = TWO_INPUTS.replace(old, new)
    assert broken != TWO_INPUTS
    assert not valid_block(broken)


def test_valid_block_rejects_missing_instruction() -> None:
    no_text = ONE_INPUT.replace("When was the park approved? Cite your source.\n", "")
    assert "ENDINSTRUCTION" in no_text
    assert not valid_block(no_text)
    no_block = ONE_INPUT.split("BEGININSTRUCTION")[0]
    assert not valid_block(no_block)


def test_valid_block_rejects_empty_input_text() -> None:
    assert not valid_block(
        ONE_INPUT.replace("The city council approved the new park on Tuesday.\n", "")
    )


# --- JsonlSink ------------------------------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqlStore]:
    s = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 'sink.sqlite'}")
    await s.connect()
    yield s
    await s.close()


def test_complete_lines_truncates_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    good = '{"instruction": "a", "response": "b", "category": "general"}\n' * 2
    path.write_text(good + '{"instruction": "tor', encoding="utf-8")
    sink = JsonlSink(path)
    assert sink.complete_lines() == 2
    assert path.read_text(encoding="utf-8") == good
    assert len(sink.read_rows()) == 2
    assert JsonlSink(tmp_path / "absent.jsonl").complete_lines() == 0


def test_complete_lines_of_only_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"instr')
    assert JsonlSink(path).complete_lines() == 0
    assert path.read_bytes() == b""


async def test_reconcile_appends_rows_the_file_lacks(tmp_path: Path, store: SqlStore) -> None:
    await store.jobs.ensure("j", config={}, targets={"general": 10, "writing": 10})
    stored = await store.rows.add(
        "j",
        [
            (f"s:{i}", Item(instruction=f"q{i}", response=f"a{i}", category=cat))
            for i, cat in enumerate(["general", "writing", "general", "writing", "general"])
        ],
    )
    path = tmp_path / "out.jsonl"
    sink = JsonlSink(path)
    sink.write(stored[:2])
    # A crash mid-write: half of the third row made it to disk.
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(stored[2].item.to_row())[:15])

    assert await sink.reconcile(store.rows, "j") == 3
    rows = sink.read_rows()
    assert rows == [s.item.to_row() for s in stored]
    assert [r["instruction"] for r in rows] == ["q0", "q1", "q2", "q3", "q4"]

    # Reconciling again adds nothing.
    assert await sink.reconcile(store.rows, "j") == 0
    assert len(sink.read_rows()) == 5


async def test_reconcile_creates_a_missing_file(tmp_path: Path, store: SqlStore) -> None:
    await store.jobs.ensure("j", config={}, targets={"general": 10})
    await store.rows.add("j", [("s:0", Item(instruction="q", response="a", category="general"))])
    sink = JsonlSink(tmp_path / "sub" / "out.jsonl")
    assert await sink.reconcile(store.rows, "j") == 1
    assert sink.read_rows() == [{"instruction": "q", "response": "a", "category": "general"}]


def test_read_rows_reports_a_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text('{"a": 1}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"out\.jsonl:2"):
        JsonlSink(path).read_rows()
