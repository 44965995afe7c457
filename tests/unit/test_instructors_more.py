"""cot, plan, roleplay, song, misconception, card, experience, detailed_writing and
counterfactual_contextual: their prompts, parsers and rows, against the scripted server,
and one embedded run of all nine."""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from airoboros.catalog import validate_instructor
from airoboros.cli.embedded import Generation
from airoboros.config import InstructorConfig, load_config, parse_config
from airoboros.contracts import BatchStats, GenerateBatch, Item
from airoboros.generator.instructors.base import PROMPTS_DIR, Ctx, Filtered, Instructor
from airoboros.generator.instructors.contextual import valid_block
from airoboros.generator.instructors.counterfactual import (
    CounterfactualContextual,
    Fact,
    parse_counterfactual,
    split_source,
    wrap,
)
from airoboros.generator.instructors.longform import (
    DetailedWriting,
    clean_task,
    load_seeds,
    parse_experience,
)
from airoboros.generator.registry import create, implemented_instructors
from airoboros.llm.factory import make_llm
from tests.e2e.helpers import read_rows, write_config
from tests.fakes.llm_server import ServerThread

NINE = [
    "cot", "plan", "roleplay", "song", "misconception", "card",
    "experience", "detailed_writing", "counterfactual_contextual",
]  # fmt: skip
PLACEHOLDER = re.compile(r"\{\w+\}")
#: the markers each step-1 prompt must keep untranslated
MARKERS = {
    "cot": ["TSK"],
    "plan": ["TSK"],
    "roleplay": ["TSK"],
    "song": ["TSK"],
    "misconception": ["QUESTION", "ANSWER"],
    "card": ["PROMPT", "ANSWER"],
    "experience": ["SETTING", "EXPERIENCE"],
    "counterfactual_contextual": ["FACTS", "COUNTER", "QUESTIONS"],
}
LENGTH = re.compile(r" Your response should be approximately (\d+) words\.$")


@pytest.fixture
async def made() -> AsyncIterator[Callable[..., Instructor]]:
    """Factory: ``made(name, base_url, **instructor_keys)``: one instructor with a real LLM
    client (closed afterwards)."""
    clients: list[Any] = []

    def build(name: str, base_url: str, language: str = "English", **keys: Any) -> Instructor:
        config = parse_config(
            {
                "model": "gpt-4",
                "openai_api_key": "sk-test",
                "base_url": base_url,
                "language": language,
                "request_timeout": 10,
                "max_retries": 0,
                "response_filters": ["as an ai"],
                "instructors": {name: keys},
            }
        )
        llm = make_llm(config)
        clients.append(llm)
        return create(name, Ctx(name, config, llm, random.Random(5)))

    yield build
    for c in clients:
        await c.close()


def batch(name: str, n: int = 3, topics: list[str] | None = None, remaining: int = 50) -> Any:
    return GenerateBatch(
        job_id="job", instructor=name, batch_size=n, topics=topics or [], remaining=remaining
    )


async def rows_of(inst: Instructor, n: int = 3, **kw: Any) -> tuple[list[Item], BatchStats]:
    stats = BatchStats()
    candidates = await inst.propose(batch(inst.name, n, **kw), stats)
    rows: list[Item] = []
    for c in candidates:
        rows.extend(r for r in await inst.respond(c, stats) if isinstance(r, Item))
    return rows, stats


# --- every instructor: registered, prompts, model, rows -------------------------------


def test_all_nine_are_registered():
    impl = implemented_instructors()
    assert set(NINE) <= set(impl)
    for name in NINE:
        assert impl[name].name == name


@pytest.mark.parametrize("name", NINE)
async def test_prompts_render_fully_and_rows_have_the_right_shape(name, llm_server, made):
    srv: ServerThread = llm_server()
    keys: dict[str, Any] = {"model": "gpt-4o-mini"}
    if name == "detailed_writing":
        keys["word_count"] = 150
    inst = made(name, srv.base_url, language="Klingon", **keys)
    topics = ["tide pools", "old maps", "glass bells"] if inst.spec.uses_topics else None
    rows, stats = await rows_of(inst, 3, topics=topics)

    assert rows, stats
    prompts = srv.llm.prompts
    raw_task_sent = name in ("plan", "roleplay", "song")  # no response prompt
    for p in prompts[:1] if raw_task_sent else prompts:
        assert not PLACEHOLDER.search(p), PLACEHOLDER.search(p)
        assert "Klingon" in p  # {language} filled in every prompt, responses included
    for marker in MARKERS.get(name, []):
        assert marker in prompts[0]
    if name in MARKERS:
        assert "never translate" in prompts[0]
    # The per-instructor model is used for every call.
    assert {m for m, _ in srv.llm.requests_log} == {"gpt-4o-mini"}

    for r in rows:
        assert r.category == name
        assert r.instruction.strip() and r.response.strip()
        assert r.system is None and not r.skip_prompt_formatting
    # 3 tasks, pairs or facts asked for: 3 rows, but counterfactual makes two per fact.
    assert len(rows) == (6 if name == "counterfactual_contextual" else 3)
    assert len({r.instruction for r in rows}) == len(rows)

    if name == "cot":
        assert all("Best and final answer:" in r.response for r in rows)
        assert any("Ranking of solutions" in p for p in prompts[1:])
    if name == "plan":
        assert all(re.search(r"^(#E1|:evidence0:) = \w+\[", r.response, re.M) for r in rows)
        assert all("Tools:" in r.instruction for r in rows)
    if raw_task_sent:
        assert {r.instruction for r in rows} <= set(prompts[1:])
    if name == "card":
        assert all(re.match(r"^\w+: ", r.response) for r in rows)
    if name == "experience":
        assert all(
            r.instruction.endswith((".", "?")) and "SETTING" not in r.instruction for r in rows
        )
        assert all("EXPERIENCE" not in r.response for r in rows)
    if name == "counterfactual_contextual":
        assert all(valid_block(r.instruction) for r in rows)
    if name == "detailed_writing":
        for r in rows:
            m = LENGTH.search(r.instruction)
            assert m and int(m.group(1)) == len(r.response.split())


# --- the refusal filter (reference §1.3) --------------------------------------------------

FILTERS = {
    # name: (filter on step 1, filter on the response step)
    "cot": (False, False),
    "plan": (False, False),
    "roleplay": (True, True),
    "song": (True, True),
    "misconception": (True, True),
    "card": (True, True),
    "experience": (False, False),
    "detailed_writing": (False, False),
    "counterfactual_contextual": (True, True),
}


def test_refusal_filter_settings_match_the_original():
    impl = implemented_instructors()
    for name, (step1, step2) in FILTERS.items():
        cls = impl[name]
        assert cls.filter_responses is step1, name
        assert getattr(cls, "filter_task_responses", step1) is step2, name


@pytest.mark.parametrize("name", ["roleplay", "song", "cot", "plan"])
async def test_a_refused_response_is_dropped_only_where_the_filter_applies(name, llm_server, made):
    srv = llm_server(force=["ok", "refusal"])  # the task list, then the first response
    inst = made(name, srv.base_url)
    stats = BatchStats()
    candidates = await inst.propose(batch(name, 2), stats)
    if FILTERS[name][1]:
        with pytest.raises(Filtered):
            await inst.respond(candidates[0], stats)
    else:
        rows = await inst.respond(candidates[0], stats)
        assert isinstance(rows[0], Item) and rows[0].response.startswith("I'm sorry")


async def test_a_refused_inline_answer_is_filtered(llm_server, made):
    srv = llm_server(force=["refusal"])
    inst = made("misconception", srv.base_url)
    stats = BatchStats()
    assert await inst.propose(batch("misconception"), stats) == []
    assert (stats.refused, stats.unparseable) == (1, 0)


# --- malformed answers and wrong counts ---------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["cot", "plan", "roleplay", "song", "misconception", "card", "counterfactual_contextual"],
)
async def test_an_answer_without_markers_gives_no_candidates(name, llm_server, made):
    srv = llm_server(force=["malformed"])
    inst = made(name, srv.base_url)
    stats = BatchStats()
    assert await inst.propose(batch(name), stats) == []
    assert (stats.unparseable, stats.refused, stats.filtered) == (1, 0, 0)


async def test_experience_without_markers_is_filtered_per_call(llm_server, made):
    srv = llm_server(force=["malformed", "ok", "malformed"])
    inst = made("experience", srv.base_url)
    stats = BatchStats()
    candidates = await inst.propose(batch("experience", 3), stats)
    assert len(candidates) == 1 and stats.unparseable == 2


def _with_count(tmp_path: Path, name: str, old: str, new: str) -> str:
    text = (PROMPTS_DIR / f"{name}.txt").read_text(encoding="utf-8")
    assert old in text
    path = tmp_path / f"my_{name}.txt"
    path.write_text(text.replace(old, new), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    ("name", "old", "new"),
    [
        ("cot", "exactly {batch_size} tasks", "exactly 7 tasks"),
        ("song", "exactly {batch_size} tasks", "exactly 7 tasks"),
        ("misconception", "exactly {batch_size} question", "exactly 7 question"),
        ("card", "exactly {batch_size} prompt", "exactly 7 prompt"),
        ("counterfactual_contextual", "write {batch_size} short", "write 7 short"),
    ],
)
async def test_more_items_than_the_batch_size_are_cut(tmp_path, name, old, new, llm_server, made):
    srv = llm_server()
    # A user prompt (prompt_path) that asks for 7 items whatever the batch size.
    inst = made(name, srv.base_url, prompt_path=_with_count(tmp_path, name, old, new))
    candidates = await inst.propose(batch(name, 3), BatchStats())
    assert len(candidates) == 3


async def test_fewer_items_than_the_batch_size_are_kept(tmp_path, llm_server, made):
    srv = llm_server()
    path = _with_count(tmp_path, "plan", "exactly {batch_size} tasks", "exactly 2 tasks")
    inst = made("plan", srv.base_url, prompt_path=path)
    assert len(await inst.propose(batch("plan", 4), BatchStats())) == 2


# --- experience ----------------------------------------------------------------------------


def test_parse_experience():
    good = "SETTING:\nA glass garden under the sea.\n\nTake me there.\n\nEXPERIENCE:\nYou step in."
    assert parse_experience(good) == (
        "A glass garden under the sea.\n\nTake me there.",
        "You step in.",
    )
    assert parse_experience("Sure! " + good) is not None
    assert parse_experience("A garden.\n\nEXPERIENCE:\nYou step in.") is None
    assert parse_experience("SETTING:\nA garden.\nYou step in.") is None
    assert parse_experience("SETTING:\nA garden.\nEXPERIENCE:\n   ") is None
    assert parse_experience("SETTING:\n\nEXPERIENCE:\nYou step in.") is None
    assert parse_experience("EXPERIENCE:\nYou step in.\nSETTING:\nA garden.") is None


@pytest.mark.parametrize(("keys", "words"), [({}, 800), ({"word_count": 1234}, 1234)])
async def test_experience_honours_word_count(keys, words, llm_server, made):
    srv = llm_server()
    inst = made("experience", srv.base_url, **keys)
    stats = BatchStats()
    candidates = await inst.propose(batch("experience", 2), stats)
    assert len(srv.llm.prompts) == 2  # batch_size calls, one experience each
    assert all(f"about {words} words long" in p for p in srv.llm.prompts)
    assert len(candidates) == 2
    rows = await inst.respond(candidates[0], stats)
    assert isinstance(rows[0], Item) and len(rows[0].response.split()) >= words
    assert len(srv.llm.prompts) == 2  # the experience came with the setting: no 2nd call


@pytest.mark.parametrize("name", ["experience", "detailed_writing"])
def test_word_count_is_validated(name):
    for bad in (0, -5, "many", True, 12.5):
        problems = validate_instructor(name, InstructorConfig.model_validate({"word_count": bad}))
        assert any(p.startswith("word_count:") for p in problems), bad
    assert validate_instructor(name, InstructorConfig.model_validate({"word_count": 900})) == []


# --- detailed_writing ------------------------------------------------------------------------


def test_seeds_load_from_the_packaged_file_and_from_a_folder(tmp_path):
    packaged = load_seeds("detailed_writing_seeds.txt")
    assert len(packaged) >= 3
    assert all("BEGINEXAMPLE" not in s and "ENDEXAMPLE" not in s for s in packaged)
    assert load_seeds("detailed_writing_seeds") == packaged  # the original's folder name
    (tmp_path / "seeds").mkdir()
    (tmp_path / "seeds" / "0.txt").write_text("BEGINEXAMPLE\nWrite a saga.\nENDEXAMPLE\n")
    (tmp_path / "seeds" / "1.txt").write_text("Write an ode to rain.\n")
    assert load_seeds(str(tmp_path / "seeds")) == ["Write a saga.", "Write an ode to rain."]
    bad = InstructorConfig.model_validate({"seed_path": str(tmp_path / "nope")})
    assert any(p.startswith("seed_path:") for p in validate_instructor("detailed_writing", bad))
    ok = InstructorConfig.model_validate({"seed_path": str(tmp_path / "seeds")})
    assert validate_instructor("detailed_writing", ok) == []


def test_clean_task_strips_echoed_markers():
    assert clean_task("BEGINEXAMPLE\nWrite a saga.\nENDEXAMPLE") == "Write a saga."
    assert clean_task("  Write a saga.\nENDEXAMPLE") == "Write a saga."


async def test_detailed_writing_tasks_use_seeds_topics_and_remaining(llm_server, made):
    srv = llm_server()
    inst = made("detailed_writing", srv.base_url)
    assert isinstance(inst, DetailedWriting)
    stats = BatchStats()
    candidates = await inst.propose(
        batch("detailed_writing", 3, topics=["tide pools", "old maps", "bells"]), stats
    )
    assert len(candidates) == 3 and len(srv.llm.prompts) == 3
    topics = ['"tide pools"', '"old maps"', '"bells"']
    for p in srv.llm.prompts:  # one topic per call (calls arrive in any order)
        assert sum(t in p for t in topics) == 1
        assert re.search(r"BEGINEXAMPLE\n\S.*?\nENDEXAMPLE", p, re.S)
    assert all(any(t in p for p in srv.llm.prompts) for t in topics)
    seeds_used = {
        re.search(r"BEGINEXAMPLE\n(.*?)\nENDEXAMPLE", p, re.S).group(1) for p in srv.llm.prompts
    }  # type: ignore[union-attr]
    assert len(seeds_used) == 3  # seeds rotate
    # Only as many tasks as rows are still needed: each costs four long calls.
    await inst.propose(batch("detailed_writing", 3, remaining=1), stats)
    assert len(srv.llm.prompts) == 4


async def test_detailed_writing_is_one_conversation_of_four_calls(llm_server, made):
    srv = llm_server()
    inst = made("detailed_writing", srv.base_url, word_count=300)
    stats = BatchStats()
    (candidate,) = await inst.propose(batch("detailed_writing", 1, topics=["kites"]), stats)
    before = len(srv.llm.prompts)
    (row,) = await inst.respond(candidate, stats)
    calls = srv.llm.prompts[before:]
    assert len(calls) == 4
    # A chat request's prompt is its messages joined: each call carries the whole
    # conversation so far (the earlier prompts and their answers) and one new prompt.
    for prev, cur in pairwise(calls):
        assert cur.startswith(prev + "\n") and len(cur) > len(prev)
    third = int(300 * 1.3 / 3)
    assert f"about {int(300 * 1.3)} words" in calls[0] and candidate.instruction in calls[0]
    assert f"at least {third} words" in calls[0]
    assert "Now write the second part" in calls[1] and f"at least {third} words" in calls[1]
    assert "Now write the final part" in calls[2].split(calls[1])[1]
    assert "rewrite the three parts above" in calls[3].split(calls[2])[1]
    assert isinstance(row, Item) and row.category == "detailed_writing"
    assert row.instruction == (
        f"{candidate.instruction} Your response should be approximately "
        f"{len(row.response.split())} words."
    )
    # The combined text is (at least) as long as the three parts.
    assert len(row.response.split()) >= 3 * third


async def test_detailed_writing_retries_truncated_answers_a_bounded_number_of_times(
    llm_server, made
):
    srv = llm_server(force=["ok", "truncate", "ok", "ok", "truncate", "ok", "ok"])
    inst = made("detailed_writing", srv.base_url, word_count=120)
    stats = BatchStats()
    (candidate,) = await inst.propose(batch("detailed_writing", 1), stats)
    rows = await inst.respond(candidate, stats)
    assert len(rows) == 1 and len(srv.llm.prompts) == 1 + 4 + 2

    srv = llm_server(force=["ok", "truncate", "truncate", "truncate", "ok"])
    inst = made("detailed_writing", srv.base_url, word_count=120)
    (candidate,) = await inst.propose(batch("detailed_writing", 1), stats)
    with pytest.raises(Filtered):
        await inst.respond(candidate, stats)
    assert len(srv.llm.prompts) == 1 + DetailedWriting.attempts


# --- counterfactual_contextual -------------------------------------------------------------

CF_ANSWER = """FACTS:
1. The Eiffel Tower was completed in 1889 for the World's Fair in Paris. It was the tallest
structure in the world until 1930. [source: https://en.wikipedia.org/wiki/Eiffel_Tower]
2. Marie Curie won the Nobel Prize in Physics in 1903. [https://www.nobelprize.org/curie]
3. The Great Fire of London began in a bakery on Pudding Lane in 1666.

COUNTER:
1. The Eiffel Tower was completed in 1925 for a trade fair in Lyon. It was the tallest
structure in the world until 1960.
2. Marie Curie won the Nobel Prize in Chemistry in 1921.
3. The Great Fire of London began in a brewery on Fish Street in 1701.

QUESTIONS:
1. When was the Eiffel Tower completed?
2. In which year did Marie Curie win her first Nobel Prize?
3. Where did the Great Fire of London begin?
"""


def test_parse_counterfactual_keeps_each_fact_once_with_its_source():
    facts = parse_counterfactual(CF_ANSWER)
    assert [f.number for f in facts] == [1, 2, 3]
    assert facts[0].source == "https://en.wikipedia.org/wiki/Eiffel_Tower"
    assert facts[0].fact.endswith("until 1930.") and "[" not in facts[0].fact
    assert "\n" in facts[0].fact  # a multi-line item stays whole
    assert facts[1].source == "https://www.nobelprize.org/curie"
    assert facts[2].source is None
    assert facts[1].counter == "Marie Curie won the Nobel Prize in Chemistry in 1921."
    assert facts[2].question == "Where did the Great Fire of London begin?"


def test_parse_counterfactual_keeps_only_complete_triples():
    short = CF_ANSWER.replace("3. The Great Fire of London began in a brewery", "X.")
    assert [f.number for f in parse_counterfactual(short)] == [1, 2]
    no_q2 = CF_ANSWER.replace("2. In which year", "In which year")
    assert [f.number for f in parse_counterfactual(no_q2)] == [1, 3]
    assert parse_counterfactual(CF_ANSWER.replace("COUNTER:", "")) == []
    assert parse_counterfactual(CF_ANSWER.replace("QUESTIONS:", "")) == []
    assert parse_counterfactual(CF_ANSWER.replace("FACTS:", "")) == []
    assert parse_counterfactual("Sure! Here are some facts.") == []
    # A fact repeated in the same answer, or a "counterfactual" that changes nothing.
    twice = CF_ANSWER.replace(
        "3. The Great Fire of London began in a bakery on Pudding Lane in 1666.",
        "3. Marie Curie won the Nobel Prize in Physics in 1903. [https://www.nobelprize.org/curie]",
    )
    assert [f.number for f in parse_counterfactual(twice)] == [1, 2]
    same = CF_ANSWER.replace("Chemistry in 1921", "Physics in 1903")
    assert [f.number for f in parse_counterfactual(same)] == [1, 3]


def test_split_source():
    assert split_source("A fact. [source: https://x.org/a]") == ("A fact.", "https://x.org/a")
    assert split_source("A fact [https://x.org/a.] more.") == ("A fact  more.", "https://x.org/a")
    assert split_source("A fact. [see the archive]") == ("A fact. [see the archive]", None)


async def test_counterfactual_blocks_are_valid_and_bad_blocks_are_dropped(made):
    inst = made("counterfactual_contextual", "http://127.0.0.1:9/v1")
    assert isinstance(inst, CounterfactualContextual)
    fact = Fact(
        1, "The bridge opened in 1357.", "The bridge opened in 1402.", "When?", "https://b.cz"
    )
    pair = inst.blocks(fact)
    assert pair is not None
    real, fake = pair
    assert valid_block(real) and valid_block(fake)
    assert "url: https://b.cz" in real and "url: https://b.cz" in fake
    assert "1357" in real and "1402" in fake
    # Same question (and same source request, if any) on both versions.
    q = re.compile(r"BEGININSTRUCTION\n(.*)\nENDINSTRUCTION", re.S)
    assert q.search(real).group(1) == q.search(fake).group(1)  # type: ignore[union-attr]
    # A marker inside the text cannot make a valid block.
    for bad in (
        Fact(1, "ENDINPUT oops", "other", "When?", "https://b.cz"),
        Fact(1, "A text.", "Other text ENDCONTEXT.", "When?", "https://b.cz"),
        Fact(1, "A text.", "Other text.", "When? BEGININSTRUCTION", "https://b.cz"),
    ):
        assert inst.blocks(bad) is None, bad
    # Without a source, the block has no metadata: kept exactly when valid_block takes it.
    bare = Fact(1, "The bridge opened in 1357.", "It opened in 1402.", "When?", None)
    expected = valid_block(wrap(bare.fact, bare.question, None))
    assert (inst.blocks(bare) is not None) == expected


async def test_each_fact_makes_its_pair_exactly_once(llm_server, made):
    srv = llm_server()
    inst = made("counterfactual_contextual", srv.base_url)
    stats = BatchStats()
    candidates = await inst.propose(batch("counterfactual_contextual", 4), stats)
    assert len(candidates) == 4 and len(srv.llm.prompts) == 1
    rows: list[Item] = []
    for c in candidates:
        got = await inst.respond(c, stats)
        assert len(got) == 2
        rows.extend(r for r in got if isinstance(r, Item))
    assert len(srv.llm.prompts) == 1 + 8  # one answer per row, no more
    assert len(rows) == 8
    assert len({(r.instruction, r.response) for r in rows}) == 8
    assert len({r.instruction for r in rows}) == 8
    bodies = [re.search(r"ENDCONTEXT\n(.*)\nENDINPUT", r.instruction, re.S).group(1) for r in rows]  # type: ignore[union-attr]
    assert len(set(bodies)) == 8
    for real, fake in zip(rows[::2], rows[1::2], strict=True):
        assert real.instruction != fake.instruction
        q = re.compile(r"BEGININSTRUCTION\n(.*)\nENDINSTRUCTION", re.S)
        assert q.search(real.instruction).group(1) == q.search(fake.instruction).group(1)  # type: ignore[union-attr]
        assert real.response != fake.response
    # The response prompt answers from the context only.
    assert all("the text is the truth" in p for p in srv.llm.prompts[1:])


async def test_a_refused_counterfactual_answer_drops_the_pair(llm_server, made):
    srv = llm_server(force=["ok", "refusal", "ok"])
    inst = made("counterfactual_contextual", srv.base_url)
    stats = BatchStats()
    candidates = await inst.propose(batch("counterfactual_contextual", 2), stats)
    with pytest.raises(Filtered):
        await inst.respond(candidates[0], stats)


# --- an embedded run of all nine -----------------------------------------------------------


async def test_embedded_run_gives_exact_counts_and_no_duplicates(tmp_path, llm_server, embedder):
    srv = llm_server(
        # Batches ask for no more than the counts need, so few items are made: repeats
        # come often enough here that some reach dedupe.
        duplicate_rate=0.3,
        malformed_rate=0.05,
        truncate_rate=0.05,
        error_500_rate=0.03,
        force=["ok", "ok"],  # the two topic requests: faults are for the instructors
    )
    counts = {
        "cot": 3, "plan": 2, "roleplay": 3, "song": 2, "misconception": 3, "card": 2,
        "experience": 2, "detailed_writing": 2, "counterfactual_contextual": 5,
    }  # fmt: skip
    instructors: dict[str, dict[str, Any]] = {n: {"count": c} for n, c in counts.items()}
    instructors["detailed_writing"]["word_count"] = 150
    instructors["experience"]["word_count"] = 120
    cfg = write_config(
        tmp_path, srv.base_url, instructors=instructors, default_batch_size=3, max_retries=2
    )
    result = await Generation(load_config(cfg), embedder=embedder, seed=7).run()

    assert result.status == "done", result.detail
    rows = read_rows(tmp_path / "instructions.jsonl")
    assert Counter(r["category"] for r in rows) == counts
    assert len({(r["instruction"], r["response"]) for r in rows}) == len(rows)
    assert len({r["instruction"] for r in rows}) == len(rows)
    assert srv.llm.stats["duplicates_served"] > 0
    assert sum(s.duplicates for s in result.states.values()) > 0

    for r in rows:
        assert set(r) == {"instruction", "response", "category"}
        assert r["instruction"] and r["response"]
        if r["category"] == "detailed_writing":
            m = LENGTH.search(r["instruction"])
            assert m and int(m.group(1)) == len(r["response"].split())
        if r["category"] == "counterfactual_contextual":
            assert valid_block(r["instruction"])
    # Counterfactual rows come in (true, counterfactual) pairs; with an odd count the last
    # pair is cut after its true row, never before it.
    cf = [r["instruction"] for r in rows if r["category"] == "counterfactual_contextual"]
    per_fact = Counter(re.search(r"url: (\S+)", i).group(1) for i in cf)  # type: ignore[union-attr]
    assert sorted(per_fact.values()) == [1, 2, 2]
