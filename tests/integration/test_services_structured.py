"""Structured output as services: generator processes probe the endpoint once each and ask
for JSON; the job's counts stay exact (RabbitMQ, PostgreSQL, S3 as in test_services)."""

from __future__ import annotations

from tests.integration.test_services import (  # noqa: F401 (fixtures)
    assert_exact,
    expected,
    export_rows,
    post_job,
    s3,
    stack,
    start_all,
)


def test_job_with_structured_output_as_services(stack):  # noqa: F811
    llm = stack.llm  # type: ignore[attr-defined]
    llm.script.structured_output = True
    start_all(stack, generators=2)
    job_id = post_job(stack)
    status = stack.wait_job(job_id)
    assert status["status"] == "done", stack.logs()
    assert {k: v["accepted"] for k, v in status["instructors"].items()} == expected()
    assert_exact(export_rows(stack, job_id))
    item_calls = [p for p in llm.prompts if '"tasks": [' in p or '"items": [' in p]
    assert item_calls
    assert not any("TSK 1." in p for p in llm.prompts)
    # One probe per generator process at most (two generators), the rest item lists.
    assert len(item_calls) < llm.stats["response_format"] <= len(item_calls) + 2
    assert llm.stats["response_format_refused"] == 0
