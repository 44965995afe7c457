"""The deployed pipeline: topics, generator and dedupe as real processes on RabbitMQ,
PostgreSQL, Redis and S3 (moto), against the scripted LLM server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.services_harness import (
    REPO,
    Stack,
    base_env,
    create_database,
    delete_amqp,
    drop_database,
    free_port,
)

pytestmark = pytest.mark.services

JOB = {
    "model": "gpt-4",
    "topics": [f"topic {i}" for i in range(40)],
    "default_batch_size": 4,
    "max_concurrency": 8,
    "request_timeout": 10,
    "instructors": {
        "general": {"count": 8},
        "joke": {"count": 6},
        "trivia": {"count": 6},
        "coding": {"count": 5, "coding_languages": ["python"]},
    },
}


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def stack(tmp_path, s3, llm_server) -> Iterator[Stack]:
    name, url = create_database()
    srv = llm_server(latency=0.02, duplicate_rate=0.1)
    env = base_env(url, s3, srv.base_url)
    subprocess.run(
        [sys.executable, "-c", "from airoboros.cli import entry; entry()", "migrate"],
        env=env,
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    st = Stack(tmp_path, env)
    st.llm = srv.llm  # type: ignore[attr-defined]
    try:
        yield st
    finally:
        st.stop_all()
        drop_database(name)
        delete_amqp(env["AIROBOROS_AMQP_PREFIX"])


def start_all(stack: Stack, generators: int = 2) -> None:
    stack.start("dedupe", "airoboros.dedupe")
    for i in range(generators):
        stack.start(f"generator{i}", "airoboros.generator")
    stack.start("topics", "airoboros.topics")


def post_job(stack: Stack, job: dict[str, Any] | None = None) -> str:
    with stack.client() as c:
        r = c.post("/v1/jobs", json=job or JOB)
        assert r.status_code == 201, r.text
        return str(r.json()["id"])


def export_rows(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    with stack.client() as c:
        r = c.get(f"/v1/jobs/{job_id}/export", params={"format": "jsonl"})
        assert r.status_code == 200
        return [json.loads(line) for line in r.text.splitlines() if line]


def s3_rows(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    from minio import Minio

    env = stack.env
    client = Minio(env["AIROBOROS_S3_ENDPOINT"], "testing", "testing", secure=False)
    data = client.get_object(
        env["AIROBOROS_S3_BUCKET"], f"jobs/{job_id}/export/instructions.jsonl"
    ).read()
    return [json.loads(line) for line in data.decode().splitlines() if line]


def expected() -> dict[str, int]:
    return {k: v["count"] for k, v in JOB["instructors"].items()}  # type: ignore[index]


def assert_exact(rows: list[dict[str, Any]]) -> None:
    assert Counter(r["category"] for r in rows) == expected()
    keys = [(r["instruction"], r.get("system"), r["response"]) for r in rows]
    assert len(set(keys)) == len(keys), "a row was written twice"


def test_job_completes_with_exact_counts_and_lands_in_s3(stack):
    start_all(stack)
    job_id = post_job(stack)
    status = stack.wait_job(job_id)
    assert status["status"] == "done", stack.logs()
    assert {k: v["accepted"] for k, v in status["instructors"].items()} == expected()
    rows = export_rows(stack, job_id)
    assert_exact(rows)
    assert s3_rows(stack, job_id) == rows
    assert status["export"].startswith("s3://")
    assert status["tokens"]["prompt"] > 0


def test_faulty_endpoint_gives_exact_counts_as_services(stack):
    # The faulty profile of the embedded tests (tests/e2e/test_faults.py), on the services.
    script = stack.llm.script  # type: ignore[attr-defined]
    script.rate_429, script.retry_after, script.error_500_rate = 0.10, 1.0, 0.05
    script.answer_refusal_rate, script.duplicate_rate = 0.10, 0.10
    start_all(stack)
    job = {
        **JOB,
        "max_concurrency": 16,
        "instructors": {
            "general": {"count": 10},
            "trivia": {"count": 12, "batch_size": 20},
            "riddle": {"count": 8},
            "joke": {"count": 8},
            "wordgame": {"count": 8},
        },
    }
    job_id = post_job(stack, job)
    status = stack.wait_job(job_id)
    assert status["status"] == "done", stack.logs()
    rows = export_rows(stack, job_id)
    assert Counter(r["category"] for r in rows) == {
        k: v["count"]
        for k, v in job["instructors"].items()  # type: ignore[attr-defined]
    }
    assert not [r for r in rows if r["response"].startswith("I'm sorry")]
    keys = Counter((r.get("system"), r["instruction"]) for r in rows)
    assert max(keys.values()) == 1
    assert stack.llm.stats["answers_refused"] > 0 and stack.llm.stats["429"] > 0  # type: ignore[attr-defined]
    assert sum(v["refused"] for v in status["instructors"].values()) > 0
    assert sum(v["retries"] for v in status["instructors"].values()) > 0


def test_a_stopped_job_is_resumed_through_the_api(stack):
    stack.llm.script.answer_refusal_rate = 1.0  # type: ignore[attr-defined]
    start_all(stack, generators=1)
    job = {**JOB, "max_failed_batches": 3, "instructors": {"joke": {"count": 6}}}
    job_id = post_job(stack, job)
    status = stack.wait_job(job_id)
    assert status["status"] == "incomplete", stack.logs()
    assert status["detail"].startswith("joke: no usable item in")
    assert "all refused" in status["instructors"]["joke"]["stopped"]
    assert status["instructors"]["joke"]["refused"] > 0
    with stack.client() as c:
        # Healthy again: resume retries the category from its stored counts.
        stack.llm.script.answer_refusal_rate = 0.0  # type: ignore[attr-defined]
        r = c.post(f"/v1/jobs/{job_id}/resume")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "running"
        assert r.json()["instructors"]["joke"]["stopped"] is None
        status = stack.wait_job(job_id)
        assert status["status"] == "done", stack.logs()
        assert Counter(r["category"] for r in export_rows(stack, job_id)) == {"joke": 6}
        again = c.post(f"/v1/jobs/{job_id}/resume")
        assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"
        assert c.post("/v1/jobs/nope/resume").status_code == 404


def test_sigkill_of_a_generator_loses_and_repeats_nothing(stack):
    start_all(stack)
    job_id = post_job(stack)
    time.sleep(1.0)
    stack.kill("generator0")
    status = stack.wait_job(job_id)
    assert status["status"] == "done", stack.logs()
    assert_exact(export_rows(stack, job_id))


def test_sigkill_of_dedupe_and_topics_then_restart(stack):
    start_all(stack, generators=1)
    job_id = post_job(stack)
    time.sleep(1.0)
    stack.kill("dedupe")
    stack.kill("topics")
    time.sleep(1.0)
    stack.start("dedupe", "airoboros.dedupe")
    stack.start("topics", "airoboros.topics")
    status = stack.wait_job(job_id)
    assert status["status"] == "done", stack.logs()
    assert_exact(export_rows(stack, job_id))


def test_api_errors(stack):
    stack.start("topics", "airoboros.topics")
    import httpx

    r = httpx.get(f"{stack.topics_url}/v1/jobs")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = httpx.get(f"{stack.topics_url}/v1/jobs", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert httpx.get(f"{stack.topics_url}/healthz").status_code == 200
    with stack.client() as c:
        assert c.get("/v1/jobs/nope").status_code == 404
        bad = c.post("/v1/jobs", json={"default_count": "x", "instructors": {"coding": {}}})
        assert bad.status_code == 422
        problems = bad.json()["error"]["problems"]
        assert any(p.startswith("default_count") for p in problems)
        assert any("coding_languages" in p for p in problems)
        r = c.post(
            "/v1/jobs", content=b"a: [unclosed", headers={"content-type": "application/yaml"}
        )
        assert r.status_code == 422 and "YAML" in r.json()["error"]["message"]
        r = c.post("/v1/jobs", json={"instructors": {"limericks": {}}})  # nothing to make
        assert r.status_code == 422
        r = c.post("/v1/jobs", content=b"", headers={"content-type": "application/yaml"})
        assert r.status_code == 422
        assert c.get("/openapi.json").status_code == 200


def test_cancel_stops_new_llm_calls(stack):
    start_all(stack, generators=1)
    job = {**JOB, "instructors": {"general": {"count": 10_000}}}
    job_id = post_job(stack, job)
    time.sleep(2.0)
    with stack.client() as c:
        assert c.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    status = stack.wait_job(job_id, timeout=30)
    assert status["status"] == "cancelled"
    time.sleep(1.5)  # calls already in flight may finish
    before = stack.llm.stats["requests"]  # type: ignore[attr-defined]
    time.sleep(2.0)
    assert stack.llm.stats["requests"] == before  # type: ignore[attr-defined]


def test_broker_restart_mid_job(stack):
    start_all(stack, generators=1)
    job = {**JOB, "instructors": {"general": {"count": 30}, "joke": {"count": 20}}}
    job_id = post_job(stack, job)
    time.sleep(1.0)
    subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=60)
    try:
        time.sleep(3.0)
    finally:
        subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True, timeout=120)
        subprocess.run(["rabbitmqctl", "await_startup"], capture_output=True, timeout=120)
    status = stack.wait_job(job_id, timeout=240)
    assert status["status"] == "done", stack.logs()
    rows = export_rows(stack, job_id)
    assert Counter(r["category"] for r in rows) == {"general": 30, "joke": 20}
    keys = [(r["instruction"], r["response"]) for r in rows]
    assert len(set(keys)) == len(keys)


def test_poison_message_is_dead_lettered_and_shown(stack):
    import asyncio

    from airoboros.bus_amqp import AmqpBus
    from airoboros.contracts import GenerateBatch

    start_all(stack, generators=1)
    job_id = post_job(stack)

    async def poison() -> tuple[str, str]:
        bus = AmqpBus(stack.env["AIROBOROS_AMQP_URL"], prefix=stack.env["AIROBOROS_AMQP_PREFIX"])
        await bus.start()
        try:
            # An instructor no generator knows: its handler fails on every delivery.
            msg = GenerateBatch(
                job_id=job_id, instructor="no_such_instructor", batch_size=1, remaining=1
            )
            await bus.publish(msg)
            # A release of the next MAJOR: no consumer of this one may guess what it means.
            future = GenerateBatch(
                job_id=job_id, instructor="joke", batch_size=1, remaining=1, schema_version="2.0"
            )
            await bus.publish(future)
            return msg.message_id, future.message_id
        finally:
            await bus.close()

    message_id, future_id = asyncio.run(poison())
    status = stack.wait_job(job_id)
    assert status["status"] == "done", stack.logs()
    assert_exact(export_rows(stack, job_id))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with stack.client() as c:
            dead = c.get(f"/v1/jobs/{job_id}").json()["dead_letters"]
        if len(dead) >= 2:
            break
        time.sleep(0.5)
    by_id = {d["message_id"]: d for d in dead}
    assert sorted(by_id) == sorted([message_id, future_id])
    assert all(d["kind"] == "generate_batch" for d in dead)
    assert "2.0" in by_id[future_id]["reason"] and "schema" in by_id[future_id]["reason"]
    assert by_id[message_id]["reason"]


def test_embedded_and_services_give_the_same_counts(stack, tmp_path):
    import yaml

    start_all(stack, generators=1)
    job_id = post_job(stack)
    services = stack.wait_job(job_id)
    cfg = {
        **JOB,
        "openai_api_key": "sk-test",
        "base_url": stack.env["OPENAI_BASE_URL"],
        "output_path": str(tmp_path / "embedded.jsonl"),
    }
    path = tmp_path / "embedded.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in stack.env.items() if not k.startswith("AIROBOROS_")}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from airoboros.cli import entry; entry()",
            "generate-instructions",
            "-c",
            str(path),
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    embedded = Counter(
        json.loads(line)["category"]
        for line in (tmp_path / "embedded.jsonl").read_text().splitlines()
    )
    assert (
        {k: v["accepted"] for k, v in services["instructors"].items()}
        == dict(embedded)
        == expected()
    )


def test_topics_generate_route(stack):
    stack.start("topics", "airoboros.topics")
    with stack.client() as c:
        r = c.post(
            "/v1/topics:generate",
            json={
                "topic_prompt": "Give me a numbered list of 20 random topics.",
                "topic_request_count": 2,
            },
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == len(body["topics"]) >= 20
    assert len({t.lower() for t in body["topics"]}) == body["count"]


def test_the_example_config_runs_as_services(stack, tmp_path):
    """Every category of example-config.yaml, all four phases, through the real services:
    cards end up in the SQL store and the object store, rows in the export."""
    from minio import Minio

    from tests.e2e.helpers import example_config, write_docs

    start_all(stack)
    docs = write_docs(tmp_path / "d")
    cfg = example_config(tmp_path, stack.env["OPENAI_BASE_URL"], docs=docs)
    for key in ("openai_api_key", "base_url", "output_path", "topics_path"):
        cfg.pop(key)
    # A server reads no path a client names: the documents go up through the API.
    with stack.client() as c:
        files = [("files", (p.name, p.read_bytes(), "text/plain")) for p in sorted(docs.iterdir())]
        up = c.post("/v1/documents", files=files)
        assert up.status_code == 201, up.text
    cfg["instructors"]["documents"].pop("documents_path")
    cfg["instructors"]["documents"]["documents_upload"] = up.json()["id"]
    job_id = post_job(stack, cfg)
    status = stack.wait_job(job_id, timeout=400)
    assert status["status"] == "done", stack.logs()
    targets = {n: c["count"] for n, c in cfg["instructors"].items()}
    assert {k: v["accepted"] for k, v in status["instructors"].items()} == targets
    by_cat = Counter(r["category"] for r in export_rows(stack, job_id))
    assert "character" not in by_cat
    for name in ("general", "editor", "stylized_response", "awareness", "documents"):
        assert by_cat[name] == targets[name], name
    assert by_cat["rp"] >= 1 and by_cat["gtkm"] >= 1
    env = stack.env
    client = Minio(env["AIROBOROS_S3_ENDPOINT"], "testing", "testing", secure=False)
    cards = list(client.list_objects(env["AIROBOROS_S3_BUCKET"], f"jobs/{job_id}/characters/"))
    assert len(cards) == targets["character"]


SMALL_JOB = {**JOB, "instructors": {"joke": {"count": 4}, "trivia": {"count": 3}}}


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        key, value = line.rsplit(" ", 1)
        base, _, rest = key.partition("{")
        got = ",".join(sorted(p for p in rest.rstrip("}").split(",") if p))
        if base == name and got == want:
            return float(value)
    return 0.0


def test_one_job_is_one_trace_across_the_services_and_each_has_metrics(stack):
    """POST /v1/jobs -> dispatch -> generate (LLM calls) -> dedupe -> store rows: one trace
    over three processes, exported over OTLP; /metrics of each tells what it did."""
    import httpx

    from tests.fakes.otlp_collector import OtlpCollector

    with OtlpCollector() as collector:
        stack.env.update(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_BSP_SCHEDULE_DELAY": "200",
            }
        )
        for name in ("dedupe", "generator", "topics"):
            stack.start(name, f"airoboros.{name}", OTEL_SERVICE_NAME=f"airoboros-{name}")
        job_id = post_job(stack, SMALL_JOB)
        assert stack.wait_job(job_id)["status"] == "done", stack.logs()

        scraped = {
            name: httpx.get(f"http://127.0.0.1:{p.port}/metrics", timeout=5)
            for name, p in stack.procs.items()
        }
        for r in scraped.values():
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        topics, generator, dedupe = (scraped[n].text for n in ("topics", "generator", "dedupe"))
        # Rows are counted where they are committed, once each.
        assert metric(topics, "airoboros_items_total", instructor="joke", outcome="accepted") == 4
        assert metric(topics, "airoboros_items_total", instructor="trivia", outcome="accepted") == 3
        # Every call the endpoint answered is counted, by model and instructor.
        calls = sum(
            metric(
                generator, "airoboros_llm_requests_total", model="gpt-4", instructor=i, outcome="ok"
            )
            for i in ("joke", "trivia")
        )
        assert calls == len(stack.llm.traceparents) > 0
        assert metric(generator, "airoboros_llm_tokens_total", model="gpt-4",
                      instructor="joke", kind="completion") > 0  # fmt: skip
        assert metric(dedupe, "airoboros_handler_seconds_count", topic="dedupe.screen",
                      outcome="ok") >= 2  # fmt: skip
        assert 'airoboros_queue_messages{queue="' in generator  # depth, polled from RabbitMQ
        assert (
            'airoboros_http_request_duration_seconds_count{method="POST",route="/v1/jobs",status="201"}'
            in topics
        )

        stack.stop_all()  # each process flushes its spans on the way out
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            services = {s.service for s in collector.spans}
            if {"airoboros-topics", "airoboros-generator", "airoboros-dedupe"} <= services:
                break
            time.sleep(0.2)
        spans = collector.spans
    assert collector.collected.bad_requests == 0

    [post] = [s for s in spans if s.name == "POST /v1/jobs" and s.kind == 2]  # server span
    trace = [s for s in spans if s.trace_id == post.trace_id]
    by_id = {s.span_id: s for s in trace}
    assert {s.service for s in trace} == {
        "airoboros-topics",
        "airoboros-generator",
        "airoboros-dedupe",
    }
    names = {s.name for s in trace}
    for want in (
        "dispatch joke",
        "generation.batch publish",
        "generation.batch process",
        "generate joke",
        "chat gpt-4",
        "dedupe.screen process",
        "dedupe joke",
        "respond joke",
        "store rows",
        "export",
    ):
        assert want in names, (want, sorted(names))

    def reaches_post(s: Any) -> bool:
        while s.parent_id:
            if s.parent_id == post.span_id:
                return True
            parent = by_id.get(s.parent_id)
            if parent is None:
                return False
            s = parent
        return False

    # Every span of the job's work hangs under the POST, across the broker hops.
    for s in trace:
        if s is not post:
            assert reaches_post(s), s
    # Every batch that stored rows did so in this trace, and so did every LLM call.
    stored = [s for s in spans if s.name == "store rows" and s.attributes.get("airoboros.rows")]
    assert stored and all(s.trace_id == post.trace_id for s in stored)
    chats = [s for s in spans if s.name == "chat gpt-4"]
    assert chats and all(s.trace_id == post.trace_id for s in chats)
    # Each answered call carries its usage; the others are structured output's probes
    # (the scripted server refuses response_format), one per generator process at most.
    answered = [s for s in chats if "gen_ai.usage.output_tokens" in s.attributes]
    assert answered and all(s.attributes["gen_ai.usage.output_tokens"] > 0 for s in answered)
    assert len(chats) - len(answered) <= stack.llm.stats["response_format_refused"] <= 4
    # The LLM endpoint was sent the trace too (its own spans would join it).
    sent = [t for t in stack.llm.traceparents if t]
    assert sent and all(t.split("-")[1] == post.trace_id for t in sent)
