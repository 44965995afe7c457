"""The Batch API lane through the deployed services (topics, generator, dedupe on
RabbitMQ, PostgreSQL, Redis and S3) against the scripted server's files and batches API:
exact counts; a SIGKILL of topics between submit and completion submits nothing twice;
cancel cancels the open batch jobs."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import pytest

from tests.integration.test_services import export_rows, post_job, s3, stack, start_all

pytestmark = pytest.mark.services
__all__ = ["s3", "stack"]  # fixtures

COUNTS = {"general": 6, "trivia": 6}
JOB: dict[str, Any] = {
    "model": "gpt-4",
    "topics": [f"topic {i}" for i in range(40)],
    "default_batch_size": 3,
    "max_concurrency": 8,
    "request_timeout": 10,
    "batch": True,
    "batch_poll_interval": 0.2,
    "instructors": {k: {"count": v} for k, v in COUNTS.items()},
}


def lines_sent(api: Any) -> Counter[str]:
    sent: Counter[str] = Counter()
    for batch in api.batches.values():
        for line in api.contents[batch["input_file_id"]].decode().splitlines():
            sent[json.loads(line)["custom_id"]] += 1
    return sent


def assert_exact(rows: list[dict[str, Any]], counts: dict[str, int]) -> None:
    assert Counter(r["category"] for r in rows) == counts
    keys = [(r["instruction"], r["response"]) for r in rows]
    assert len(set(keys)) == len(keys), "a row was written twice"


def test_batch_job_reaches_done_with_exact_counts(stack):
    start_all(stack, generators=1)
    job_id = post_job(stack, JOB)
    status = stack.wait_job(job_id)
    assert status["status"] == "done", stack.logs()
    assert_exact(export_rows(stack, job_id), COUNTS)
    api = stack.llm.batch_api
    assert stack.llm.stats["batches_created"] >= 3
    assert max(lines_sent(api).values()) == 1
    # Every generation call was a batch line; online, none (the topics are given).
    assert stack.llm.stats["requests"] == stack.llm.stats["batch_lines"]
    by_state = status["batches"]
    assert set(by_state) == set(COUNTS)
    assert all(set(states) == {"completed"} for states in by_state.values()), by_state


def test_sigkill_of_topics_between_submit_and_completion(stack):
    stack.llm.script.batch_state_seconds = 1.0
    start_all(stack, generators=1)
    job_id = post_job(stack, JOB)
    api = stack.llm.batch_api
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not api.batches:
        time.sleep(0.05)
    assert api.batches, stack.logs()
    stack.kill("topics")
    open_at_kill = {b["id"] for b in api.batches.values() if b["status"] != "completed"}
    assert open_at_kill
    time.sleep(1.0)
    stack.start("topics", "airoboros.topics")
    status = stack.wait_job(job_id)
    assert status["status"] == "done", stack.logs()
    assert_exact(export_rows(stack, job_id), COUNTS)
    tags = Counter(b["metadata"]["airoboros_submission"] for b in api.batches.values())
    assert max(tags.values()) == 1  # no batch job created twice
    assert max(lines_sent(api).values()) == 1  # no call sent twice
    assert all(api.batches[b]["status"] == "completed" for b in open_at_kill)


def test_cancel_cancels_open_batches(stack):
    stack.llm.script.batch_state_seconds = 30.0
    start_all(stack, generators=1)
    job = {**JOB, "instructors": {"general": {"count": 1000}}}
    job_id = post_job(stack, job)
    api = stack.llm.batch_api
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not api.batches:
        time.sleep(0.05)
    assert api.batches, stack.logs()
    time.sleep(0.5)
    with stack.client() as c:
        assert c.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    status = stack.wait_job(job_id, timeout=60)
    assert status["status"] == "cancelled"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if all(b["status"] == "cancelled" for b in api.batches.values()):
            break
        time.sleep(0.2)
    assert {b["status"] for b in api.batches.values()} == {"cancelled"}
    assert stack.llm.stats["batches_cancelled"] == len(api.batches)
    with stack.client() as c:
        states = c.get(f"/v1/jobs/{job_id}").json()["batches"]
    assert states == {"general": {"cancelled": len(api.batches)}}
