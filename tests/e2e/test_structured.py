"""Structured output end to end: JSON answers where the endpoint supports response_format,
the marker formats where it does not, and a clear failure when json_schema is forced."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from airoboros.cli.embedded import Generation
from airoboros.config import load_config
from airoboros.llm.structured import forget_verdicts
from tests.e2e.helpers import read_rows, write_config

COUNTS = {"general": 6, "riddle": 3, "agent": 3, "multiple_choice": 3}


@pytest.fixture(autouse=True)
def _fresh_verdicts() -> Any:
    # Verdicts are per (base_url, model) for the process; a later server may get a port
    # an earlier one had.
    forget_verdicts()
    yield
    forget_verdicts()


async def run(cfg_path: Path, embedder: Any) -> Any:
    return await Generation(load_config(cfg_path), embedder=embedder, seed=11).run()


def item_prompts(srv: Any) -> list[str]:
    """The prompts of item-list calls (task lists and pairs), not topics nor responses."""
    return [
        p
        for p in srv.llm.prompts
        if '"tasks"' in p or '"items"' in p or "TSK 1." in p or "QUESTION:" in p or "PROMPT:" in p
    ]


async def test_auto_uses_json_where_supported(tmp_path, llm_server, embedder):
    srv = llm_server(structured_output=True)
    cfg = write_config(
        tmp_path, srv.base_url, instructors={k: {"count": n} for k, n in COUNTS.items()}
    )
    result = await run(cfg, embedder)
    assert result.status == "done", result.detail
    rows = read_rows(tmp_path / "instructions.jsonl")
    assert Counter(r["category"] for r in rows) == COUNTS
    stats = srv.llm.stats
    assert stats["response_format_refused"] == 0
    prompts = item_prompts(srv)
    assert prompts
    # Every item list was asked for as JSON: the marker instructions are gone.
    assert all('"tasks"' in p or '"items"' in p for p in prompts)
    assert not any("TSK 1." in p or "never translate" in p for p in prompts)
    # One response_format call per item list, plus the one probe.
    assert stats["response_format"] == len(prompts) + 1
    # Rows come from the JSON answers: general's instructions are the server's tasks, and
    # multiple_choice's answers name an option of their question (its check passed).
    mc = [r for r in rows if r["category"] == "multiple_choice"]
    assert all(r["response"][:2] in r["instruction"] for r in mc)
    agent = [r for r in rows if r["category"] == "agent"]
    assert all(json.loads(r["response"])["function"] == "search" for r in agent)


async def test_auto_falls_back_to_markers_and_probes_once(tmp_path, llm_server, embedder):
    srv = llm_server()
    cfg = write_config(
        tmp_path, srv.base_url, instructors={k: {"count": n} for k, n in COUNTS.items()}
    )
    result = await run(cfg, embedder)
    assert result.status == "done", result.detail
    rows = read_rows(tmp_path / "instructions.jsonl")
    assert Counter(r["category"] for r in rows) == COUNTS
    # One probe for (base_url, gpt-4), refused; every other call used the markers.
    assert srv.llm.stats["response_format_refused"] == 1
    assert srv.llm.stats["response_format"] == 0
    prompts = item_prompts(srv)
    assert prompts and not any('"tasks"' in p or '"items"' in p for p in prompts)
    assert any("TSK 1." in p for p in prompts)


async def test_off_per_instructor_keeps_markers(tmp_path, llm_server, embedder):
    srv = llm_server(structured_output=True)
    cfg = write_config(
        tmp_path,
        srv.base_url,
        instructors={"general": {"count": 4, "structured_output": "off"}, "riddle": {"count": 3}},
    )
    assert (await run(cfg, embedder)).status == "done"
    prompts = item_prompts(srv)
    general = [p for p in prompts if "TSK" in p]
    riddle = [p for p in prompts if "riddle" in p.lower()]
    assert general and all("TSK 1." in p and '"tasks"' not in p for p in general)
    assert riddle and all('"items"' in p for p in riddle)
    assert len(read_rows(tmp_path / "instructions.jsonl")) == 7


async def test_json_schema_against_a_server_without_it_fails_clearly(
    tmp_path, llm_server, embedder
):
    srv = llm_server()
    cfg = write_config(
        tmp_path,
        srv.base_url,
        structured_output="json_schema",
        instructors={"general": {"count": 4}},
    )
    result = await run(cfg, embedder)
    assert result.status == "failed"
    assert "structured_output" in (result.detail or "")
    assert "response_format" in (result.detail or "")
    assert srv.llm.stats["response_format_refused"] >= 1
    assert not (tmp_path / "instructions.jsonl").exists() or not read_rows(
        tmp_path / "instructions.jsonl"
    )


async def test_every_category_with_structured_output_and_faults(tmp_path, llm_server, embedder):
    """The example config (every category, every phase) against a server with structured
    output, faults included: exact counts; the task lists, pairs and document questions
    came as JSON, the instructors without a shape used their markers."""
    import yaml

    from tests.e2e.helpers import example_config, write_docs

    srv = llm_server(
        structured_output=True,
        latency=0.005,
        refusal_rate=0.03,
        error_500_rate=0.03,
        malformed_rate=0.03,
        duplicate_rate=0.1,
    )
    cfg = example_config(tmp_path, srv.base_url, docs=write_docs(tmp_path / "docs"))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = await run(path, embedder)
    assert result.status == "done", result.detail
    targets = {n: c["count"] for n, c in cfg["instructors"].items()}
    assert {n: s.accepted for n, s in result.states.items()} == targets
    rows = read_rows(tmp_path / "instructions.jsonl")
    by_cat = Counter(r["category"] for r in rows)
    for name in ("general", "trivia", "agent", "card", "documents", "cot"):
        assert by_cat[name] == targets[name], name
    prompts = srv.llm.prompts
    assert any('{"questions": [{"question": "<the question>", "answer"' in p for p in prompts)
    assert any('{"questions": [{"question": "<a question>"}' in p for p in prompts)  # gtkm
    assert any('"contextualanswer": "<the' in p for p in prompts)  # awareness
    assert any('{"items": [{"fact": "<3 or 4 sentences' in p for p in prompts)
    assert any('{"characters": [{"name": "<the' in p for p in prompts)
    assert by_cat["counterfactual_contextual"] == targets["counterfactual_contextual"]
    assert by_cat["awareness"] >= targets["awareness"] and by_cat["gtkm"] >= targets["gtkm"]
    assert any('{"tasks": [' in p for p in prompts)
    assert not any("TSK 1." in p for p in prompts)
    assert srv.llm.stats["response_format"] >= len(targets) // 2
