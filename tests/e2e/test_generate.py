"""generate-instructions end to end against the scripted server over real HTTP."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from airoboros.cli.embedded import Generation
from airoboros.config import load_config
from airoboros.embeddings import l2_threshold_to_cosine
from airoboros.generator.instructors.contextual import valid_block
from airoboros.generator.instructors.inline import TRIVIA_DETAIL
from airoboros.store import SqlStore
from tests.e2e.helpers import ALL_INSTRUCTORS, read_rows, write_config

REFUSAL = re.compile(r"^\s*(I'm sorry|I am sorry|Apologies|I can't|I won't)", re.I)


async def run(cfg_path: Path, embedder: Any, seed: int = 7) -> Any:
    return await Generation(load_config(cfg_path), embedder=embedder, seed=seed).run()


def assert_no_near_duplicates(rows: list[dict[str, Any]], embedder: Any, cosine: float) -> None:
    # No two rows share (system, instruction): trivia's detail row carries its request for
    # detail, as the original's did. A row re-answered in character (stylized_response)
    # shares its instruction with its source under another system prompt.
    exact = Counter((r.get("system"), r["instruction"]) for r in rows)
    repeated = [key for key, n in exact.items() if n > 1]
    assert not repeated, f"rows repeat (system, instruction): {repeated[:3]}"
    # Near-duplicates are judged on what dedupe embeds: the task without PLAINFORMAT, the
    # trivia question without the request for detail.
    texts = list(
        dict.fromkeys(
            r["instruction"].removesuffix(" PLAINFORMAT").removesuffix(TRIVIA_DETAIL) for r in rows
        )
    )
    vecs = embedder.embed(texts)
    sims = vecs @ vecs.T
    np.fill_diagonal(sims, -1)
    i, j = np.unravel_index(np.argmax(sims), sims.shape)
    assert sims[i, j] < cosine, f"near duplicates ({sims[i, j]:.3f}): {texts[i]!r} / {texts[j]!r}"


async def test_every_instructor_exact_counts_despite_faults(tmp_path, llm_server, embedder):
    srv = llm_server(
        latency=0.01,
        refusal_rate=0.08,
        duplicate_rate=0.15,
        malformed_rate=0.05,
        truncate_rate=0.05,
        error_500_rate=0.05,
        # The job makes ~75 calls: at these rates one run in forty would meet no refusal
        # or no 500 at all. The first calls after the two for topics meet both for sure;
        # the rest are drawn.
        force=["ok", "ok", "refusal", "500", "refusal", "500"],
    )
    counts = {name: 4 + i % 3 for i, name in enumerate(ALL_INSTRUCTORS)}
    instructors = {n: {**c, "count": counts[n]} for n, c in ALL_INSTRUCTORS.items()}
    cfg = write_config(tmp_path, srv.base_url, instructors=instructors)
    result = await run(cfg, embedder)

    assert result.status == "done", result.detail
    rows = read_rows(tmp_path / "instructions.jsonl")
    assert Counter(r["category"] for r in rows) == counts
    assert result.rows == len(rows)
    for r in rows:
        assert set(r) <= {"instruction", "response", "category", "system", "skip_prompt_formatting"}
        assert r["instruction"].strip() == r["instruction"] and r["instruction"]
        assert r["response"].strip() == r["response"] and r["response"]
        assert not REFUSAL.match(r["response"]), r
    assert_no_near_duplicates(rows, embedder, l2_threshold_to_cosine(0.35))
    # Faults were met and handled, not absent.
    assert srv.llm.stats["refusal"] > 0 and srv.llm.stats["500"] > 0
    assert srv.llm.stats["duplicates_served"] > 0
    assert sum(s.duplicates for s in result.states.values()) > 0
    # Lost items are counted by cause (refused, filtered, unparseable, truncated); which of
    # the rarer faults reach a many-item reply depends on timing, so their sum is checked
    # (tests/e2e/test_faults.py checks each cause on its own).
    lost = sum(s.filtered + s.refused + s.unparseable + s.truncated for s in result.states.values())
    assert lost > 0 and sum(s.refused for s in result.states.values()) > 0

    for r in rows:
        if r["category"] == "contextual":
            assert valid_block(r["instruction"]), r["instruction"]
        if r["category"] == "multiple_choice":
            assert re.match(r"^[A-E]\) ", r["response"])
            assert r["response"] in r["instruction"]
        if r["category"] == "trivia" and "system" in r:
            assert "trivia" in r["system"]
        if r["category"] == "coding" and r["instruction"].endswith("PLAINFORMAT"):
            assert "```" not in r["response"]

    # The SQL store holds exactly what the file holds, in the same order.
    store = SqlStore(load_config(cfg).resolved_database_url())
    await store.connect()
    try:
        stored = [s.item.to_row() async for s in store.rows.iterate(result.plan.job_id)]
        stats = await store.progress.stats(result.plan.job_id)
    finally:
        await store.close()
    assert stored == rows
    assert {n: stats[n].accepted for n in counts} == counts
    assert stats["topics"].requests == 2  # topic generation is paid for and counted too
    assert sum(s.prompt_tokens for s in stats.values()) > 0


async def test_topics_are_injected_and_written(tmp_path, llm_server, embedder):
    srv = llm_server()
    cfg = write_config(
        tmp_path, srv.base_url, instructors={"general": {"count": 6}, "writing": {"count": 4}}
    )
    result = await run(cfg, embedder)
    assert result.status == "done"
    topics = (tmp_path / "topics.txt").read_text().splitlines()
    assert len(topics) >= 20
    assert len({t.lower() for t in topics}) == len(topics)
    task_prompts = [p for p in srv.llm.prompts if "TSK 1." in p]
    assert task_prompts and all("must be related to topic" in p for p in task_prompts)
    assert any(t in task_prompts[0] for t in topics)


@pytest.mark.parametrize("ratio", [0.0, 1.0])
async def test_plain_ratio_is_honoured(tmp_path, llm_server, embedder, ratio):
    srv = llm_server()
    cfg = write_config(
        tmp_path,
        srv.base_url,
        instructors={"coding": {"count": 8, "coding_languages": ["python"], "plain_ratio": ratio}},
    )
    assert (await run(cfg, embedder)).status == "done"
    rows = read_rows(tmp_path / "instructions.jsonl")
    plain = [r["instruction"].endswith(" PLAINFORMAT") for r in rows]
    assert len(rows) == 8
    assert all(plain) if ratio == 1.0 else not any(plain)


async def test_per_instructor_model_is_used(tmp_path, llm_server, embedder):
    srv = llm_server()
    cfg = write_config(
        tmp_path,
        srv.base_url,
        instructors={
            "joke": {"count": 3, "model": "gpt-4o-mini"},
            "riddle": {"count": 3, "api_params": {"model": "test-model"}},
            "orca": {"count": 3},
        },
    )
    assert (await run(cfg, embedder)).status == "done"
    models = {
        kind: {m for m, p in srv.llm.requests_log if kind in p.lower()}
        for kind in ("joke", "riddle", "reasoning problems")
    }
    assert models == {
        "joke": {"gpt-4o-mini"},
        "riddle": {"test-model"},
        "reasoning problems": {"gpt-4"},
    }


async def test_completions_api(tmp_path, llm_server, embedder):
    srv = llm_server()
    cfg = write_config(
        tmp_path, srv.base_url, api="completions", instructors={"general": {"count": 4}}
    )
    assert (await run(cfg, embedder)).status == "done"
    assert len(read_rows(tmp_path / "instructions.jsonl")) == 4
    assert all(p.rstrip().endswith("ASSISTANT:") for p in srv.llm.prompts)


async def test_token_budget_stops_the_job_and_keeps_rows(tmp_path, llm_server, embedder):
    srv = llm_server(latency=0.01)
    cfg = write_config(
        tmp_path,
        srv.base_url,
        max_tokens=6000,
        max_concurrency=2,
        instructors={"general": {"count": 500}, "trivia": {"count": 500}},
    )
    result = await run(cfg, embedder)
    assert result.status == "budget_exhausted"
    assert "token budget of 6000" in (result.detail or "")
    rows = read_rows(tmp_path / "instructions.jsonl")
    assert 0 < len(rows) == result.rows
    used = result.usage.total_tokens
    billed = srv.llm.stats["prompt_tokens"] + srv.llm.stats["completion_tokens"]
    # The budget is a cap: the server never billed past it, and the job stopped only when
    # the next call would not fit even with a short answer (its prompt plus 128 tokens).
    assert billed == used <= 6000
    biggest = max(len(p) // 2 for p in srv.llm.prompts)
    assert used > 6000 - biggest - 128
    requests_at_stop = srv.llm.stats["requests"]

    # A rerun finds the budget spent and makes no call at all.
    again = await run(cfg, embedder)
    assert again.status == "budget_exhausted"
    assert srv.llm.stats["requests"] == requests_at_stop
    assert len(read_rows(tmp_path / "instructions.jsonl")) == len(rows)


async def test_cost_budget(tmp_path, llm_server, embedder):
    srv = llm_server()
    cfg = write_config(
        tmp_path,
        srv.base_url,
        max_cost=0.05,
        prices={"gpt-4": {"prompt": 30.0, "completion": 60.0}},
        max_concurrency=1,
        instructors={"orca": {"count": 1000}},
    )
    result = await run(cfg, embedder)
    assert result.status == "budget_exhausted"
    billed = (srv.llm.stats["prompt_tokens"] * 30 + srv.llm.stats["completion_tokens"] * 60) / 1e6
    assert billed == pytest.approx(result.usage.cost)
    # A cap: never past it, and stopped only when a short answer no longer fits.
    biggest = max(len(p) // 2 for p in srv.llm.prompts)
    assert 0.05 - (biggest * 30 + 128 * 60) / 1e6 < billed <= 0.05
    assert result.rows > 0


async def test_rate_limited_server_is_respected(tmp_path, llm_server, embedder):
    # 240 req/min with no burst allowance: an unpaced client would be answered 429.
    srv = llm_server(rpm_limit=240, rpm_burst_seconds=0.25)
    cfg = write_config(
        tmp_path, srv.base_url, instructors={"joke": {"count": 6}, "orca": {"count": 6}}
    )
    result = await run(cfg, embedder)
    assert result.status == "done"
    assert len(read_rows(tmp_path / "instructions.jsonl")) == 12
    assert srv.llm.stats["429"] > 0  # the limit was met, waited out and retried


async def test_configured_rate_limit_avoids_429(tmp_path, llm_server, embedder):
    srv = llm_server(rpm_limit=300, rpm_burst_seconds=0.5)
    cfg = write_config(
        tmp_path,
        srv.base_url,
        requests_per_minute=290,
        instructors={"joke": {"count": 6}, "orca": {"count": 6}, "riddle": {"count": 6}},
    )
    assert (await run(cfg, embedder)).status == "done"
    assert srv.llm.stats["429"] == 0


async def test_append_adopts_rows_of_the_original_tool(tmp_path, llm_server, embedder):
    srv = llm_server()
    out = tmp_path / "instructions.jsonl"
    old = [
        {
            "instruction": "Name three rivers of the ancient world.",
            "response": "Nile, Tigris, Euphrates.",
            "category": "general",
        },
        {
            "instruction": "Why is the sky blue?",
            "response": "Rayleigh scattering.",
            "category": "general",
        },
        {
            "instruction": "Tell me a joke about owls.",
            "response": "Whoo knows?",
            "category": "joke",
        },
    ]
    out.write_text("".join(__import__("json").dumps(r) + "\n" for r in old))
    cfg = write_config(
        tmp_path,
        srv.base_url,
        append=True,
        instructors={"general": {"count": 5}, "joke": {"count": 2}},
    )
    result = await run(cfg, embedder)
    assert result.status == "done"
    rows = read_rows(out)
    assert rows[:3] == old
    assert Counter(r["category"] for r in rows) == {"general": 5, "joke": 2}


async def test_existing_output_needs_append_or_overwrite(tmp_path, llm_server, embedder):
    from airoboros.errors import ConfigError

    srv = llm_server()
    cfg = write_config(tmp_path, srv.base_url, instructors={"joke": {"count": 2}})
    assert (await run(cfg, embedder)).status == "done"
    with pytest.raises(ConfigError, match="append: true"):
        await run(cfg, embedder)
    cfg = write_config(tmp_path, srv.base_url, overwrite=True, instructors={"joke": {"count": 3}})
    assert (await run(cfg, embedder)).status == "done"
    assert len(read_rows(tmp_path / "instructions.jsonl")) == 3


async def test_the_example_config_makes_every_category(tmp_path, llm_server, embedder):
    """example-config.yaml (the original's full set of categories, in every phase), cut to
    a few rows each, runs to the end embedded with exact counts."""
    import yaml

    from tests.e2e.helpers import example_config, write_docs

    srv = llm_server(latency=0.005, refusal_rate=0.03, error_500_rate=0.03, duplicate_rate=0.1)
    cfg = example_config(tmp_path, srv.base_url, docs=write_docs(tmp_path / "docs"))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = await run(path, embedder)
    assert result.status == "done", result.detail
    targets = {n: c["count"] for n, c in cfg["instructors"].items()}
    assert {n: s.accepted for n, s in result.states.items()} == targets
    rows = read_rows(tmp_path / "instructions.jsonl")
    by_cat = Counter(r["category"] for r in rows)
    for name, n in targets.items():
        if name == "character":
            assert name not in by_cat  # cards are artifacts, not rows
        elif name in ("rp", "gtkm"):
            assert by_cat[name] >= n  # a chat / transcript is several rows
        else:
            assert by_cat[name] == n, name
    assert len(list((tmp_path / "characters").glob("*.json"))) == targets["character"]
