"""The card phase and the instructors built on cards: character, stylized_response, gtkm,
awareness, rp, and editor (its own phase, after writing)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from airoboros.cli.embedded import Generation
from airoboros.config import load_config
from airoboros.generator.instructors.characters import (
    RpTurnError,
    parse_awareness,
    parse_cards,
    parse_turn,
)
from airoboros.store import SqlStore
from tests.e2e.helpers import read_rows, write_config


async def run(cfg_path: Path, embedder: Any, seed: int = 7) -> Any:
    return await Generation(load_config(cfg_path), embedder=embedder, seed=seed).run()


def test_parse_cards_needs_a_name_and_a_guide() -> None:
    text = (
        "DESCRIPTION: NAME: Ada Quill\nA tinkerer from a mountain town who loves gears.\n"
        "GUIDE: Speak briskly.\n\n"
        "DESCRIPTION: A nameless wanderer with no name line at all here.\nGUIDE: Be vague.\n\n"
        "DESCRIPTION: NAME: Bo\nA baker of enormous loaves in the old town.\nGUIDE:\n"
    )
    cards = parse_cards(text)
    assert [c[0].splitlines()[0] for c in cards] == ["NAME: Ada Quill"]


def test_parse_turn() -> None:
    others = ["Ada Quill", "Bram Stone"]
    msg, nxt = parse_turn("*smiles* Hello there.\nNEXT: Bram Stone", "Cora", others)
    assert (msg, nxt) == ("*smiles* Hello there.", "Bram Stone")
    # a close spelling is accepted; another character's line and a REMINDER are cut
    msg, nxt = parse_turn(
        "Cora: Fine day.\nAda Quill: I agree!\nNEXT: bram ston\nREMINDER: fiction", "Cora", others
    )
    assert (msg, nxt) == ("Fine day.", "Bram Stone")
    with pytest.raises(RpTurnError, match="names nobody"):
        parse_turn("Hello.\nNEXT: The Narrator", "Cora", others)
    with pytest.raises(RpTurnError, match="no NEXT"):
        parse_turn("Hello.", "Cora", others)


def test_parse_awareness() -> None:
    text = (
        "QUESTION: What time is it?\nCONTEXT: It is 9am on 1 May 2024.\n"
        "ANSWER: I cannot know.\nCONTEXTUALANSWER: It is 9am.\n"
        "QUESTION: Is it raining?\nANSWER: I cannot see.\nCONTEXTUALANSWER: Yes.\n"
    )
    assert [b["q"] for b in parse_awareness(text, with_context=True)] == ["What time is it?"]
    both = parse_awareness(text, with_context=False)
    assert [b["ca"] for b in both] == ["It is 9am.", "Yes."]


CARD_PHASE = {
    "general": {"count": 6},
    "writing": {"count": 4, "styles": ["happy"]},
    "trivia": {"count": 4},
    "editor": {"count": 3},
    "character": {"count": 4},
    "stylized_response": {"count": 4, "categories": ["general", "trivia"]},
    "gtkm": {"count": 2, "question_count": 4},
    "awareness": {"count": 6},
    "rp": {"count": 2, "turn_count": 5},
}


async def test_phases_cards_and_exact_counts(tmp_path, llm_server, embedder, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the cards folder ("characters") is relative, as the original
    srv = llm_server(latency=0.005, refusal_rate=0.03, error_500_rate=0.03)
    cfg = write_config(tmp_path, srv.base_url, instructors=CARD_PHASE)
    result = await run(cfg, embedder)
    assert result.status == "done", result.detail
    rows = read_rows(tmp_path / "instructions.jsonl")
    by_cat = Counter(r["category"] for r in rows)
    assert "character" not in by_cat  # cards are not rows
    # every prompt sent had its placeholders filled
    for prompt in srv.llm.prompts:
        assert not re.search(r"\{[a-z_]+\}", prompt), prompt[:300]

    # rp and gtkm count chats/transcripts: several rows each, the count is exact in the store
    for name, spec in CARD_PHASE.items():
        if name == "character":
            continue
        if name in ("rp", "gtkm"):
            assert by_cat[name] >= spec["count"], (name, by_cat)
        else:
            assert by_cat[name] == spec["count"], (name, by_cat)
    assert result.states["rp"].accepted == 2 and result.states["gtkm"].accepted == 2
    assert result.states["character"].accepted == 4

    # cards: in the store, unique by name, and on disk as the original kept them
    store = SqlStore(load_config(cfg).resolved_database_url())
    await store.connect()
    try:
        cards = await store.artifacts.of_kind(result.plan.job_id, "character")
    finally:
        await store.close()
    names = [c.name for c in cards]
    assert len(names) == 4 and len({n.lower() for n in names}) == 4
    files = sorted((tmp_path / "characters").glob("*.json"))
    assert len(files) == 4
    assert {json.loads(f.read_text())["name"] for f in files} == set(names)
    assert all(
        set(json.loads(f.read_text())) == {"name", "description", "stay_in_character"}
        for f in files
    )

    # phases: every main-phase row comes before editor rows, editor before card users
    order = [r["category"] for r in rows]
    last_main = max(i for i, c in enumerate(order) if c in ("general", "writing", "trivia"))
    first_editor = order.index("editor")
    card_users = [
        i for i, c in enumerate(order) if c in ("stylized_response", "gtkm", "awareness", "rp")
    ]
    assert last_main < first_editor < min(card_users)
    assert max(i for i, c in enumerate(order) if c == "editor") < min(card_users)

    writing = {r["response"] for r in rows if r["category"] == "writing"}
    for r in rows:
        if r["category"] == "editor":
            assert r["response"] in writing
            assert r["instruction"].startswith("Rewrite the following text to improve/correct it.")
            assert r["response"] not in r["instruction"]
        if r["category"] == "stylized_response":
            assert r["system"].startswith("You are to take on the role of: ")
            assert r["system"].split("\n")[0].split(": ", 1)[1] in names
            assert "REMINDER" not in r["response"] and "SKIP" not in r["response"]
            assert "Stay in character" not in r["system"]  # the rules are not stored
        if r["category"] in ("rp", "gtkm"):
            assert r["skip_prompt_formatting"] is True
            speaker = r["response"].split(":", 1)[0]
            assert speaker in names
        if r["category"] == "rp":
            assert r["instruction"].startswith("This is a chat between ")
            assert "NEXT:" not in r["response"] and "NEXT:" not in r["instruction"]
        if r["category"] == "awareness":
            assert (
                r.get("system", "").startswith("A chat. ")
                or r.get("skip_prompt_formatting")
                or "system" not in r
            )

    # rp rows of one chat: each instruction extends the one before
    rp = [r for r in rows if r["category"] == "rp"]
    chats = Counter(r["instruction"].split("Setting for the chat:")[1][:60] for r in rp)
    assert len(chats) == 2

    # a rerun changes nothing: counts (rp, gtkm included) come back from the store
    before = (tmp_path / "instructions.jsonl").read_text()
    cfg = write_config(tmp_path, srv.base_url, instructors=CARD_PHASE, append=True)
    again = await run(cfg, embedder, seed=8)
    assert again.status == "done"
    assert (tmp_path / "instructions.jsonl").read_text() == before


async def test_card_users_work_without_a_character_section(
    tmp_path, llm_server, embedder, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    srv = llm_server(latency=0.0)
    cfg = write_config(
        tmp_path,
        srv.base_url,
        default_count=3,
        instructors={"gtkm": {"count": 2, "question_count": 3}},
    )
    result = await run(cfg, embedder)
    assert result.status == "done", result.detail
    assert "character" in result.plan.active
    assert any("gtkm needs character" in w for w in result.plan.warnings)
    assert result.states["character"].accepted == 3
    assert result.states["gtkm"].accepted == 2


async def test_existing_cards_are_adopted(tmp_path, llm_server, embedder, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "cards"
    folder.mkdir()
    for i, name in enumerate(["Old Salt", "Madame Verre"]):
        (folder / f"{i}.json").write_text(
            json.dumps(
                {
                    "name": name,
                    "description": f"NAME: {name}\nA person.",
                    "stay_in_character": "Be.",
                }
            )
        )
    srv = llm_server(latency=0.0)
    cfg = write_config(
        tmp_path,
        srv.base_url,
        instructors={
            "character": {"count": 3, "output_dir": str(folder)},
            "rp": {"count": 1, "turn_count": 3},
        },
    )
    result = await run(cfg, embedder)
    assert result.status == "done", result.detail
    assert result.states["character"].accepted == 3
    # the two adopted cards keep their files; the one new card gets an md5-named file
    made = [p for p in folder.glob("*.json") if p.name not in ("0.json", "1.json")]
    assert len(made) == 1


async def test_editor_without_writing_rows_is_skipped_not_failed(tmp_path, llm_server, embedder):
    srv = llm_server(latency=0.0)
    cfg = write_config(
        tmp_path, srv.base_url, instructors={"general": {"count": 2}, "editor": {"count": 2}}
    )
    result = await run(cfg, embedder)
    assert result.status == "done"
    assert "editor skipped" in (result.detail or "")
    assert Counter(r["category"] for r in read_rows(tmp_path / "instructions.jsonl")) == {
        "general": 2
    }
