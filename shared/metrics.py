"""Prometheus metrics, served on ``GET /metrics`` by every service (the API apps and the
workers' probe server). One registry per process; each service fills the families it
has a part in, the others stay empty.

Families (all prefixed ``airoboros_``):
- bus: ``queue_messages`` / ``queue_consumers`` (per queue, read from RabbitMQ every
  ``QUEUE_POLL_SECONDS``), ``message_lag_seconds`` (publish to the start of handling, per
  topic: the consumer lag as a message feels it), ``handler_seconds`` (per topic, outcome);
- LLM calls, by model and instructor: ``llm_requests_total`` (outcome ok or the error
  code), ``llm_tokens_total`` (kind prompt/completion), ``llm_cost_usd_total``,
  ``llm_request_seconds``; ``llm_concurrency_window`` (calls the adaptive AIMD window
  lets in flight; max_concurrency while it is off);
- rows, by instructor: ``items_total`` (outcome accepted, duplicate, filtered, refused,
  unparseable, truncated, withheld, dropped), counted once per batch when it is committed;
- routing: ``routing_decisions_total`` (expert, method), ``routing_decision_seconds``;
- HTTP: ``http_request_duration_seconds`` (method, route template, status);
- adapters: ``adapter_loads_total`` (outcome), ``adapter_evictions_total``,
  ``adapters_resident``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

QUEUE_POLL_SECONDS = 15.0

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_LONG = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)

QUEUE_MESSAGES = Gauge(
    "airoboros_queue_messages", "Messages ready in a queue (RabbitMQ's count)", ["queue"]
)
QUEUE_CONSUMERS = Gauge("airoboros_queue_consumers", "Consumers of a queue", ["queue"])
MESSAGE_LAG = Histogram(
    "airoboros_message_lag_seconds",
    "Time from a message's publication to the start of its handling",
    ["topic"],
    buckets=_LONG,
)
HANDLER_SECONDS = Histogram(
    "airoboros_handler_seconds", "Time a handler took", ["topic", "outcome"], buckets=_LONG
)

LLM_REQUESTS = Counter(
    "airoboros_llm_requests_total",
    "LLM calls (each attempt), by outcome: ok or the error code",
    ["model", "instructor", "outcome"],
)
LLM_TOKENS = Counter(
    "airoboros_llm_tokens_total", "LLM tokens used", ["model", "instructor", "kind"]
)
LLM_COST = Counter("airoboros_llm_cost_usd_total", "LLM cost in USD", ["model", "instructor"])
LLM_SECONDS = Histogram(
    "airoboros_llm_request_seconds", "Duration of one LLM call", ["model"], buckets=_LONG
)
LLM_CONCURRENCY_WINDOW = Gauge(
    "airoboros_llm_concurrency_window",
    "LLM calls allowed in flight: the adaptive (AIMD) window, else max_concurrency",
)

ITEMS = Counter(
    "airoboros_items_total",
    "Items by fate: accepted (stored), duplicate, filtered, refused, unparseable (replies), "
    "truncated (replies), withheld (no room in the count), dropped (past the count)",
    ["instructor", "outcome"],
)

ROUTING = Counter(
    "airoboros_routing_decisions_total", "Experts chosen by the router", ["expert", "method"]
)
ROUTING_SECONDS = Histogram(
    "airoboros_routing_decision_seconds", "Time to choose an expert", buckets=_LATENCY
)

HTTP_SECONDS = Histogram(
    "airoboros_http_request_duration_seconds",
    "HTTP requests served",
    ["method", "route", "status"],
    buckets=_LATENCY,
)

ADAPTER_LOADS = Counter("airoboros_adapter_loads_total", "LoRA adapter loads", ["outcome"])
ADAPTER_EVICTIONS = Counter(
    "airoboros_adapter_evictions_total", "LoRA adapters evicted to make room"
)
ADAPTERS_RESIDENT = Gauge("airoboros_adapters_resident", "LoRA adapters in memory")


def exposition() -> tuple[bytes, str]:
    """The registry in Prometheus' text format, and its content type."""
    return generate_latest(), CONTENT_TYPE_LATEST


Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Any]


class MetricsMiddleware:
    """Request durations by route template (``/v1/jobs/{job_id}``, so a label never holds
    an id), and ``GET /metrics``. Raw ASGI: it adds no per-request object churn."""

    def __init__(self, app: ASGIApp, skip: tuple[str, ...] = ("/healthz", "/readyz")) -> None:
        self.app = app
        self.skip = skip

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path == "/metrics" and scope.get("method") == "GET":
            body, ctype = exposition()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", ctype.encode())],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        if path in self.skip:
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            HTTP_SECONDS.labels(scope.get("method", "?"), template, str(status)).observe(
                time.perf_counter() - start
            )


def instrument(app: Any) -> None:
    """``/metrics`` and request durations for a FastAPI app (its spans are FastAPI's own:
    ``airoboros.telemetry.fastapi``)."""
    app.add_middleware(MetricsMiddleware)
