"""Traces, metrics and logs: context across the bus, JSON log lines with trace ids, the
/metrics routes, and when the exporters switch on."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from airoboros import metrics, telemetry
from airoboros.bus import InMemoryBus
from airoboros.contracts import BatchCompleted, GenerateBatch
from airoboros.health import HealthServer
from airoboros.logs import JsonFormatter


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    assert telemetry.setup("airoboros-test", exporter=exporter)
    return exporter


async def test_a_message_and_what_its_handler_publishes_stay_in_the_trace(spans) -> None:
    spans.clear()
    bus = InMemoryBus()
    seen: list[str] = []

    async def on_batch(msg: GenerateBatch) -> None:
        with telemetry.span("generate"):
            await bus.publish(
                BatchCompleted(job_id=msg.job_id, task_id=msg.task_id, instructor="joke")
            )

    async def on_done(msg: BatchCompleted) -> None:
        ids = telemetry.log_ids()
        assert ids is not None
        seen.append(ids[0])

    bus.subscribe(GenerateBatch, on_batch)
    bus.subscribe(BatchCompleted, on_done)
    await bus.start()
    with telemetry.span("POST /v1/jobs") as root:
        await bus.publish(GenerateBatch(job_id="j", instructor="joke", batch_size=1, remaining=1))
    await bus.drain()
    await bus.close()

    trace_id = format(root.get_span_context().trace_id, "032x")
    assert seen == [trace_id]
    got = spans.get_finished_spans()
    assert {format(s.context.trace_id, "032x") for s in got} == {trace_id}
    names = [s.name for s in got]
    for want in (
        "generation.batch publish",
        "generation.batch process",
        "generate",
        "generation.completed publish",
        "generation.completed process",
    ):
        assert want in names
    process = next(s for s in got if s.name == "generation.batch process")
    assert process.attributes is not None and process.attributes["airoboros.job_id"] == "j"


async def test_a_stored_context_is_continued_later(spans) -> None:
    """A job stores the context of the request that created it; its batches, dispatched
    later (another replica, after a restart), continue that trace."""
    spans.clear()
    with telemetry.span("POST /v1/jobs") as root:
        stored = telemetry.current_context()
    assert stored["traceparent"].split("-")[1] == format(root.get_span_context().trace_id, "032x")
    with telemetry.span("dispatch joke", parent=stored) as later:
        pass
    assert later.get_span_context().trace_id == root.get_span_context().trace_id
    assert later.parent is not None and later.parent.span_id == root.get_span_context().span_id


def test_json_log_lines_carry_the_trace_and_span_ids(spans) -> None:
    fmt = JsonFormatter()
    record = logging.LogRecord("airoboros.x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    outside = json.loads(fmt.format(record))
    assert outside["msg"] == "hello you" and "trace_id" not in outside
    with telemetry.span("work") as s:
        inside = json.loads(fmt.format(record))
    ctx = s.get_span_context()
    assert inside["trace_id"] == format(ctx.trace_id, "032x")
    assert inside["span_id"] == format(ctx.span_id, "016x")


def test_exporters_follow_the_standard_variables(monkeypatch) -> None:
    for var in ("OTEL_TRACES_EXPORTER", "OTEL_SDK_DISABLED", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    wanted = telemetry._exporters_wanted
    assert wanted(default_on=True) == []  # nowhere to send: nothing
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    assert wanted(default_on=True) == ["otlp"]  # a service with a collector
    assert wanted(default_on=False) == []  # the CLI: off unless asked
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp,console")
    assert wanted(default_on=False) == ["otlp", "console"]
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert wanted(default_on=True) == []
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert wanted(default_on=True) == []


async def test_api_metrics_label_routes_by_template_not_by_id(spans) -> None:
    from fastapi import FastAPI

    app = FastAPI()
    metrics.instrument(app)

    @app.get("/v1/jobs/{job_id}")
    async def job(job_id: str) -> dict[str, str]:
        return {"id": job_id}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        for i in range(3):
            assert (await c.get(f"/v1/jobs/abc{i}")).status_code == 200
        assert (await c.get("/nope")).status_code == 404
        r = await c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    sample = 'airoboros_http_request_duration_seconds_count{method="GET",route="/v1/jobs/{job_id}",status="200"}'
    line = next(x for x in r.text.splitlines() if x.startswith(sample))
    assert float(line.split()[-1]) >= 3
    assert "abc1" not in r.text
    assert 'route="unmatched",status="404"' in r.text


async def test_a_request_is_a_server_span_continuing_the_callers_trace(spans) -> None:
    from fastapi import FastAPI
    from opentelemetry.trace import SpanKind

    app = FastAPI(telemetry=telemetry.fastapi())  # as the three APIs are made
    metrics.instrument(app)

    @app.post("/v1/chat/completions")
    async def chat() -> dict[str, str]:
        return {"ok": "yes"}

    spans.clear()
    caller = "0af7651916cd43dd8448eb211c80319c"
    header = f"00-{caller}-b7ad6b7169203331-01"
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        r = await c.post("/v1/chat/completions", headers={"traceparent": header})
        assert r.status_code == 200
        assert (await c.get("/healthz")).status_code == 404  # a probe path: no span
    [server] = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert server.name == "POST /v1/chat/completions"
    assert format(server.context.trace_id, "032x") == caller
    assert server.parent is not None and format(server.parent.span_id, "016x") == "b7ad6b7169203331"
    assert server.attributes is not None
    assert server.attributes["http.response.status_code"] == 200


async def test_workers_serve_metrics_beside_their_probes(unused_tcp_port: int) -> None:
    metrics.ADAPTER_EVICTIONS.inc()
    server = HealthServer("127.0.0.1", unused_tcp_port, lambda: True)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{unused_tcp_port}") as c:
            r = await c.get("/metrics")
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/plain")
            assert "airoboros_adapter_evictions_total" in r.text
            assert (await c.get("/readyz")).json() == {"status": "ready"}
            assert (await c.get("/other")).status_code == 404
    finally:
        await server.close()


def _sample(name: str, **labels: Any) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_llm_calls_are_counted_by_model_and_instructor(llm_server) -> None:
    from airoboros.llm import LLMClient, LLMSettings
    from airoboros.llm.accounting import UsageMeter
    from airoboros.llm.limiter import RateLimiter

    srv = llm_server(latency=0.0)
    settings = LLMSettings(base_url=srv.base_url, api_key="sk-test", max_retries=0)
    client = LLMClient(settings, RateLimiter(max_concurrency=2), UsageMeter())
    before = _sample("airoboros_llm_requests_total", model="gpt-4", instructor="joke", outcome="ok")
    try:
        with telemetry.span("generate"):
            await asyncio.gather(
                *(
                    client.complete(
                        [{"role": "user", "content": "tell me a joke"}],
                        model="gpt-4",
                        instructor="joke",
                    )
                    for _ in range(3)
                )
            )
    finally:
        await client.close()
    after = _sample("airoboros_llm_requests_total", model="gpt-4", instructor="joke", outcome="ok")
    assert after - before == 3
    assert (
        _sample("airoboros_llm_tokens_total", model="gpt-4", instructor="joke", kind="prompt") > 0
    )
    # The endpoint got the caller's trace.
    assert all(t.startswith("00-") for t in srv.llm.traceparents[-3:])
