"""The Batch API lane end to end, embedded (``airoboros generate-instructions`` with
``batch: true``) against the scripted server's files and batches API: exact counts for a
two-step and a one-step instructor, the batch price, expired batches and failed lines
retried, and a SIGKILL between submit and completion that neither submits a batch twice
nor loses one."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from airoboros.cli.embedded import Generation
from airoboros.config import load_config
from tests.e2e.helpers import REPO, airoboros_cmd, cli_env, read_rows, run_cli, write_config

#: general: a task list, then one response per accepted task (two steps);
#: trivia: question/answer pairs in one call (one step).
COUNTS = {"general": 6, "trivia": 6}
#: USD per million tokens, prompt and completion alike (gpt-4's batch discount: 0.5)
PRICE = 10.0


def batch_config(tmp: Path, base_url: str, counts: dict[str, int] = COUNTS, **over: Any) -> Path:
    settings: dict[str, Any] = {
        "batch": True,
        "batch_poll_interval": 0.05,
        "prices": {"gpt-4": {"prompt": PRICE, "completion": PRICE}},
        "instructors": {k: {"count": v} for k, v in counts.items()},
    }
    settings.update(over)
    return write_config(tmp, base_url, **settings)


async def run(cfg: Path, embedder: Any, seed: int = 7) -> Any:
    return await Generation(load_config(cfg), embedder=embedder, seed=seed).run()


def store_rows(tmp: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(tmp / "instructions.jsonl.sqlite") as conn:
        return list(conn.execute(sql))


def submissions(tmp: Path) -> list[tuple[str, str, str | None]]:
    """(instructor, state, batch id) of every batch job the run's store has."""
    return store_rows(tmp, "SELECT instructor, state, batch_id FROM batch_submissions")  # type: ignore[return-value]


def lines_sent(srv: Any) -> Counter[str]:
    """How many times each call (custom_id) was sent in a batch job, over all of them."""
    api = srv.llm.batch_api
    sent: Counter[str] = Counter()
    for batch in api.batches.values():
        for line in api.contents[batch["input_file_id"]].decode().splitlines():
            sent[json.loads(line)["custom_id"]] += 1
    return sent


async def test_batch_job_gives_exact_counts_at_the_batch_price(tmp_path, llm_server, embedder):
    srv = llm_server()
    result = await run(batch_config(tmp_path, srv.base_url), embedder)

    assert result.status == "done", result.detail
    rows = read_rows(tmp_path / "instructions.jsonl")
    assert Counter(r["category"] for r in rows) == COUNTS
    assert all(r["instruction"].strip() and r["response"].strip() for r in rows)
    stats = srv.llm.stats
    # general: a batch for its task lists, then one for the responses; trivia: one.
    by_inst = Counter(inst for inst, _, _ in submissions(tmp_path))
    assert by_inst["general"] >= 2 and by_inst["trivia"] >= 1, by_inst
    assert stats["batches_created"] == sum(by_inst.values())
    # Every generation call went through batch jobs; online, only the topics.
    assert stats["requests"] - stats["batch_lines"] == 2, dict(stats)
    assert max(lines_sent(srv).values()) == 1  # no call paid for twice
    assert 1 <= stats["peak_open_per_instructor"] <= 2  # batch_max_open
    # The batch lines are billed at half the price, in the store and in the report.
    for name in COUNTS:
        st = result.states[name]
        assert st.tokens > 0
        assert st.cost == pytest.approx(0.5 * st.tokens * PRICE / 1e6, rel=1e-6)
        assert st.batches == {"open": 0, "done": by_inst[name], "failed": 0}
    instructors_cost = sum(result.states[n].cost for n in COUNTS)
    assert result.usage.cost >= instructors_cost > 0


async def test_expired_batch_and_failed_lines_are_retried(tmp_path, llm_server, embedder):
    srv = llm_server(batch_outcomes=["expired", "failed"], batch_line_errors=2)
    cfg = batch_config(tmp_path, srv.base_url, batch_max_attempts=4)
    result = await run(cfg, embedder)

    assert result.status == "done", result.detail
    rows = read_rows(tmp_path / "instructions.jsonl")
    assert Counter(r["category"] for r in rows) == COUNTS
    states = Counter(state for _, state, _ in submissions(tmp_path))
    assert states["expired"] == 1 and states["failed"] == 1, states
    assert srv.llm.stats["batches_created"] == sum(states.values())
    # The calls of the expired and the failed batch, and the two failed lines, were sent
    # again; none was sent more often than its attempts allow.
    sent = lines_sent(srv)
    assert sum(n - 1 for n in sent.values()) >= 2 + 1
    assert max(sent.values()) <= 4


async def test_a_call_whose_attempts_are_spent_fails_and_the_job_goes_on(
    tmp_path, llm_server, embedder
):
    # The first batch of each instructor expires and may not be sent again: its calls
    # fail, their tasks are counted as failed, and new tasks make the rows.
    srv = llm_server(batch_outcomes=["expired", "expired"])
    cfg = batch_config(tmp_path, srv.base_url, batch_max_attempts=1)
    result = await run(cfg, embedder)

    assert result.status == "done", result.detail
    assert Counter(r["category"] for r in read_rows(tmp_path / "instructions.jsonl")) == COUNTS
    assert max(lines_sent(srv).values()) == 1
    assert sum(result.states[n].failures for n in COUNTS) >= 2


def test_sigkill_between_submit_and_completion_resubmits_nothing(tmp_path, llm_server):
    # Each batch job takes about 3 x 0.6 s: the kill lands while some are open.
    srv = llm_server(batch_state_seconds=0.6)
    counts = {"general": 8, "trivia": 8}
    cfg = batch_config(tmp_path, srv.base_url, counts, batch_poll_interval=0.1, batch_max_open=1)
    out = tmp_path / "instructions.jsonl"
    env = cli_env()
    proc = subprocess.Popen(
        [*airoboros_cmd("generate-instructions", "--config-path", str(cfg))],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    api = srv.llm.batch_api
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = [b for b in api.batches.values() if b["status"] == "completed"]
        running = [b for b in api.batches.values() if b["status"] != "completed"]
        if done and running:
            break
        if proc.poll() is not None:
            raise AssertionError(f"finished before the kill: {proc.stderr.read()!r}")  # type: ignore[union-attr]
        time.sleep(0.02)
    else:
        raise AssertionError("no batch completed while another was open")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    open_at_kill = {b["id"] for b in api.batches.values() if b["status"] != "completed"}
    created_before = srv.llm.stats["batches_created"]
    before = read_rows(out) if out.exists() else []

    again = run_cli("generate-instructions", "--config-path", str(cfg), env=env)
    assert again.returncode == 0, again.stderr
    rows = read_rows(out)
    assert Counter(r["category"] for r in rows) == counts
    assert rows[: len(before)] == before  # 0 lost
    keys = [(r["instruction"], r["response"]) for r in rows]
    assert len(set(keys)) == len(keys)  # 0 duplicated
    # No batch job was created twice, nor any call sent twice: the batches open at the
    # kill were polled to the end and their answers used.
    tags = Counter(b["metadata"]["airoboros_submission"] for b in api.batches.values())
    assert max(tags.values()) == 1
    assert max(lines_sent(srv).values()) == 1
    assert srv.llm.stats["batches_created"] == len(submissions(tmp_path))
    assert srv.llm.stats["batches_created"] >= created_before
    stored = {b for _, _, b in submissions(tmp_path)}
    assert open_at_kill <= stored
    assert all(api.batches[b]["status"] == "completed" for b in open_at_kill)
    assert srv.llm.stats["peak_open_per_instructor"] == 1  # batch_max_open, across the kill
    assert "batch 0 open" in again.stderr, again.stderr


async def test_the_budget_holds_each_batch_and_is_never_passed(tmp_path, llm_server, embedder):
    srv = llm_server()
    cfg = batch_config(
        tmp_path,
        srv.base_url,
        {"general": 20, "trivia": 20},
        topics=[f"topic {i}" for i in range(40)],  # no online call at all
        max_completion_tokens=300,
        max_cost=0.05,
        prices={},  # gpt-4's own: $30/$60 per million tokens, batch lines at half
    )
    result = await run(cfg, embedder)

    assert result.status == "budget_exhausted", result.detail
    stats = srv.llm.stats
    assert stats["requests"] == stats["batch_lines"] > 0
    billed = 0.5 * (stats["prompt_tokens"] * 30 + stats["completion_tokens"] * 60) / 1e6
    assert billed <= 0.05
    assert result.usage.cost == pytest.approx(billed, rel=1e-6)
    rows = read_rows(tmp_path / "instructions.jsonl")
    assert 0 < len(rows) < 40


async def test_the_token_budget_holds_each_batch_and_is_never_passed(
    tmp_path, llm_server, embedder
):
    srv = llm_server()
    cfg = batch_config(
        tmp_path,
        srv.base_url,
        {"general": 20, "trivia": 20},
        topics=[f"topic {i}" for i in range(40)],  # no online call at all
        max_completion_tokens=300,
        max_tokens=2500,
    )
    result = await run(cfg, embedder)

    assert result.status == "budget_exhausted", result.detail
    stats = srv.llm.stats
    assert stats["requests"] == stats["batch_lines"] > 0
    billed = stats["prompt_tokens"] + stats["completion_tokens"]
    assert billed <= 2500
    assert result.usage.total_tokens == billed
    rows = read_rows(tmp_path / "instructions.jsonl")
    assert 0 < len(rows) < 40
