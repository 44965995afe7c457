"""``GET /v1/jobs/{id}/report`` on the deployed pipeline (topics, generator and dedupe
as processes on RabbitMQ, PostgreSQL, Redis and S3, against the scripted LLM server):
the report of a finished job agrees with its exported rows; the route's auth and 404."""

from __future__ import annotations

from collections import Counter

import httpx
import pytest

from tests.integration import test_services as services

pytestmark = pytest.mark.services

# The deployed stack of tests/integration/test_services.py.
s3, stack = services.s3, services.stack

JOB = {
    **services.JOB,
    "instructors": {"general": {"count": 8}, "joke": {"count": 5}},
}


def test_report_of_a_finished_job_matches_its_export(stack):
    services.start_all(stack, generators=1)
    job_id = services.post_job(stack, JOB)
    status = stack.wait_job(job_id)
    assert status["status"] == "done", stack.logs()
    rows = services.export_rows(stack, job_id)
    per_category = Counter(r["category"] for r in rows)
    assert per_category == {"general": 8, "joke": 5}

    with stack.client() as c:
        r = c.get(f"/v1/jobs/{job_id}/report")
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["job_id"] == job_id and report["status"] == "done"
    by = {cat["category"]: cat for cat in report["categories"]}
    for name, n in per_category.items():
        cat = by[name]
        assert (cat["kept"], cat["rows"], cat["target"]) == (n, n, n)
        # every kept row was a proposed candidate that dedupe did not reject
        assert cat["proposed"] >= cat["kept"] + cat["duplicates"]
        assert cat["dedupe_yield"] == pytest.approx(n / (n + cat["duplicates"]), abs=1e-4)
        assert cat["requests"] > 0
        assert cat["prompt_tokens"] == status["instructors"][name]["prompt_tokens"]
        assert cat["cost"] == pytest.approx(status["instructors"][name]["cost"], rel=1e-3)
        assert cat["cost_per_kept"] == pytest.approx(cat["cost"] / n, rel=1e-3)
        assert cat["cost_to_finish"] == 0.0
        assert cat["wasted_tokens"] == status["instructors"][name]["wasted_tokens"]
        div = cat["diversity"]
        assert div["instructions"] == n
        assert 0 < div["distinct_1"] <= 1 and 0 < div["distinct_2"] <= 1
        assert div["compression_ratio"] > 0
        # both share the job's dedupe index, in PostgreSQL; each is measured on its own
        # vectors there (every candidate dedupe accepted: the kept rows at least)
        assert div["nn_scope"] == "category" and div["nn_sampled"] >= n
        assert -1.0 <= div["nn_cosine"] <= 1.0
    totals = report["totals"]
    assert (totals["kept"], totals["rows"], totals["target"]) == (len(rows), len(rows), 13)
    assert totals["duplicates"] == sum(c["duplicates"] for c in report["categories"])
    assert totals["diversity"]["instructions"] == len(rows)
    job_nn = totals["diversity"]
    assert job_nn["nn_scope"] == "job"
    assert job_nn["nn_sampled"] == sum(c["diversity"]["nn_sampled"] for c in report["categories"])

    with stack.client() as c:
        assert c.get("/v1/jobs/nope/report").status_code == 404
        # another key sees no job of this one: the same 404
        r = c.get(f"/v1/jobs/{job_id}/report", headers={"Authorization": "Bearer another-key"})
        assert r.status_code == 404
        assert r.json()["error"]["message"]
    r = httpx.get(f"{stack.topics_url}/v1/jobs/{job_id}/report", timeout=30)
    assert r.status_code == 401
