"""The main job against a misbehaving endpoint: it finishes while progress is possible,
stops by itself (incomplete, rows kept) when it is not, resumes on the next run, loses
only the bad items of a reply, and never lets the endpoint bill past the budget."""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from airoboros.cli.embedded import Generation
from airoboros.config import load_config
from airoboros.contracts import BatchStats, GenerateBatch
from airoboros.generator.instructors.base import Ctx
from airoboros.generator.instructors.inline import TRIVIA_DETAIL, Trivia
from tests.e2e.helpers import cli_env, read_rows, run_cli, write_config
from tests.fakes.llm_server import REFUSAL_TEXT

REFUSAL = re.compile(r"^\s*(I'm sorry|I am sorry|Apologies|I can't|I won't)", re.I)

#: The side-by-side run of the issue: five categories, trivia 20 pairs per call.
MAIN = {
    "general": {"count": 20},
    "trivia": {"count": 20, "batch_size": 20},
    "riddle": {"count": 20},
    "joke": {"count": 20},
    "wordgame": {"count": 20},
}
#: 10% 429 (Retry-After 1 s), 5% 500, 10% of answers refused, 10% of items repeated.
FAULTY: dict[str, Any] = {
    "rate_429": 0.10,
    "retry_after": 1.0,
    "error_500_rate": 0.05,
    "answer_refusal_rate": 0.10,
    "duplicate_rate": 0.10,
}


async def run(cfg: Path, embedder: Any, seed: int = 7) -> Any:
    return await Generation(load_config(cfg), embedder=embedder, seed=seed).run()


def assert_clean_dataset(rows: list[dict[str, Any]], counts: dict[str, int]) -> None:
    assert Counter(r["category"] for r in rows) == counts
    assert not [r for r in rows if REFUSAL.match(r["response"])], "a refusal became a row"
    keys = Counter((r.get("system"), r["instruction"]) for r in rows)
    assert max(keys.values()) == 1, [k for k, n in keys.items() if n > 1][:3]


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
async def test_faulty_endpoint_gives_exact_counts(tmp_path, llm_server, embedder, seed):
    # The first two requests meet a 429 and a 500 for sure; the rest are drawn from a
    # random stream whose order depends on timing, and a short run can draw no 500.
    srv = llm_server(latency=0.005, seed=seed, force=["429", "500"], **FAULTY)
    cfg = write_config(tmp_path, srv.base_url, instructors=MAIN, default_batch_size=5)
    result = await run(cfg, embedder, seed=seed)

    assert result.status == "done", result.detail
    rows = read_rows(tmp_path / "instructions.jsonl")
    assert_clean_dataset(rows, {n: 20 for n in MAIN})
    # Trivia's detail rows carry the request for detail, as the original's did.
    details = [r for r in rows if r["category"] == "trivia" and "system" not in r]
    assert details and all(r["instruction"].endswith(TRIVIA_DETAIL.strip()) for r in details)
    # The faults were there, and each was counted where it belongs.
    stats = srv.llm.stats
    assert stats["429"] > 0 and stats["500"] > 0
    assert stats["answers_refused"] > 0 and stats["duplicates_served"] > 0
    assert sum(s.refused for s in result.states.values()) > 0
    assert result.retries >= stats["429"] + stats["500"] - 1


async def test_one_refused_pair_costs_that_pair_only(llm_server):
    srv = llm_server()
    cfg = load_config(write_config(Path("/tmp"), srv.base_url, instructors={"trivia": {}}))

    class Canned(Trivia):
        reply = ""
        finish = "stop"

        async def _complete(self, prompt: str, *_: Any) -> tuple[str, str | None, tuple[int, int]]:
            return self.reply, self.finish, (500, 500)

    inst = Canned(Ctx("trivia", cfg, None))  # type: ignore[arg-type]
    pairs = [f"QUESTION: What is item {i} of the list?\nANSWER: Item {i}" for i in range(20)]
    pairs[7] = f"QUESTION: What is item 7 of the list?\nANSWER: {REFUSAL_TEXT}"
    inst.reply = "\n\n".join(pairs)
    task = GenerateBatch(job_id="j", instructor="trivia", batch_size=20, remaining=20)
    stats = BatchStats()
    got = await inst.propose(task, stats)
    assert len(got) == 19 and "item 7 " not in " ".join(c.instruction for c in got)
    assert (stats.refused, stats.filtered, stats.unparseable) == (1, 0, 0)

    # A reply cut off by the token limit keeps its complete items; the last may be cut.
    inst.reply, inst.finish = "\n\n".join(pairs[:12]) + "\n\nQUESTION: What is it", "length"
    stats = BatchStats()
    got = await inst.propose(task, stats)
    assert [c.instruction for c in got][-1] == "What is item 10 of the list?"
    assert len(got) == 10 and stats.truncated == 1  # items 0-10 but 7 (refused); 11 cut


async def test_refusing_endpoint_stops_the_job_then_a_rerun_completes_it(
    tmp_path, llm_server, embedder
):
    srv = llm_server(latency=0.005, answer_refusal_rate=1.0)
    instructors = {"general": {"count": 6}, "joke": {"count": 6}}
    cfg = write_config(tmp_path, srv.base_url, instructors=instructors, max_failed_batches=4)
    result = await run(cfg, embedder)
    assert result.status == "incomplete"
    detail = result.detail or ""
    for name in instructors:
        # At least 4 (batches already in flight when the 4th failed finish too).
        assert re.search(rf"{name}: no usable item in [4-9] batches in a row", detail), detail
    assert "all refused" in detail and "I'm sorry" in detail
    out = tmp_path / "instructions.jsonl"
    assert not out.exists() or read_rows(out) == []
    # Few calls were paid for: the two topic requests, then few batches per category.
    assert srv.llm.stats["requests"] <= 2 + 2 * 7

    # The endpoint is healthy again: the same config resumes and completes exactly.
    srv.llm.script.answer_refusal_rate = 0.0
    again = await run(cfg, embedder)
    assert again.status == "done", again.detail
    assert_clean_dataset(read_rows(tmp_path / "instructions.jsonl"), {"general": 6, "joke": 6})


@pytest.mark.parametrize(
    ("script", "overrides", "cause"),
    [
        ({"malformed_rate": 1.0}, {}, "unparseable answers"),
        ({}, {"response_filters": [".*"]}, "filtered by response_filters"),
        ({"error_500_rate": 1.0}, {"max_retries": 1}, "endpoint errors"),
    ],
)
async def test_a_job_that_cannot_progress_says_why_and_ends(
    tmp_path, llm_server, embedder, script, overrides, cause
):
    srv = llm_server(latency=0.002, **script)
    cfg = write_config(
        tmp_path,
        srv.base_url,
        instructors={"riddle": {"count": 5}},
        max_failed_batches=3,
        **overrides,
    )
    result = await run(cfg, embedder)
    assert result.status == "incomplete"
    assert (result.detail or "").startswith("riddle: no usable item in 3 batches in a row")
    assert cause in (result.detail or "")


def test_cli_exit_code_and_one_line_for_an_incomplete_job(tmp_path, llm_server):
    srv = llm_server(answer_refusal_rate=1.0)
    cfg = write_config(
        tmp_path, srv.base_url, instructors={"joke": {"count": 3}}, max_failed_batches=3
    )
    proc = run_cli("generate-instructions", "--config-path", str(cfg), env=cli_env())
    assert proc.returncode == 5, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("airoboros: incomplete: joke: no usable item in 3 batches")
    assert "rerunning the same config" in last
    assert "refused" in proc.stderr  # the summary counts them apart


async def test_each_retried_call_is_logged(tmp_path, llm_server, embedder, caplog):
    srv = llm_server(force=["429", "500"], retry_after=0.1)
    cfg = write_config(tmp_path, srv.base_url, instructors={"joke": {"count": 2}})
    with caplog.at_level(logging.INFO, logger="airoboros.llm.client"):
        result = await run(cfg, embedder)
    assert result.status == "done" and result.retries == 2
    lines = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert any("rate limited (status 429); retry 1 of" in m for m in lines), lines
    assert any("failed (status 500); retry" in m for m in lines), lines


@pytest.mark.parametrize(
    "budget",
    [
        {"max_tokens": 60_000},
        {"max_tokens": 60_000, "max_completion_tokens": 400},
        {"max_cost": 1.5, "prices": {"gpt-4": {"prompt": 30.0, "completion": 60.0}}},
    ],
)
async def test_the_endpoint_never_bills_past_the_budget(tmp_path, llm_server, embedder, budget):
    # 32 calls in flight at once, each slow enough that all are out together.
    srv = llm_server(latency=0.3, latency_jitter=0.2)
    instructors = {
        n: {"count": 200, "batch_size": 5}
        for n in ("general", "trivia", "riddle", "joke", "wordgame", "orca")
    }
    cfg = write_config(
        tmp_path, srv.base_url, instructors=instructors, max_concurrency=32, **budget
    )
    result = await run(cfg, embedder)
    assert result.status == "budget_exhausted"
    billed_tokens = srv.llm.stats["prompt_tokens"] + srv.llm.stats["completion_tokens"]
    assert billed_tokens == result.usage.total_tokens
    # Calls the server was answering at once (each sleeps its latency there).
    assert srv.llm.peak_in_flight >= 24, srv.llm.peak_in_flight
    if "max_tokens" in budget:
        assert billed_tokens <= budget["max_tokens"]
        assert billed_tokens > 0.8 * budget["max_tokens"]  # a cap, not a cut-off early
    else:
        billed = srv.llm.stats["prompt_tokens"] * 30 + srv.llm.stats["completion_tokens"] * 60
        assert billed / 1e6 <= budget["max_cost"]
        assert billed / 1e6 > 0.8 * budget["max_cost"]
