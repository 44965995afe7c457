"""Tracing with OpenTelemetry: one trace from ``POST /v1/jobs`` to the last stored row.

How the context travels:
- HTTP: FastAPI traces each request itself (a server span continuing the caller's W3C
  ``traceparent``; ``fastapi()`` below); the router's backend client, the LLM client and
  httpx (TGI) send it on.
- The bus: ``publish`` opens a producer span and writes its context into the message's
  headers (AMQP headers on RabbitMQ); a consumer continues from them in a consumer span,
  so a handler's work, and whatever it publishes, belongs to the trace of the message.
- Jobs: the context of the request that created a job is stored with it, and the
  controller dispatches the job's batches (and its export) under it, from any replica and
  after any restart.

``setup(service)`` configures the process from the standard variables:
``OTEL_SDK_DISABLED``, ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``, ``none``; comma-separated) and the
``OTEL_EXPORTER_OTLP_*`` family. Services export with OTLP when an OTLP endpoint is set
and ``OTEL_TRACES_EXPORTER`` is not; the CLI only when ``OTEL_TRACES_EXPORTER`` asks.
Without the SDK (a CLI-only install) nothing is recorded and nothing fails.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

from airoboros.contracts import Message

if TYPE_CHECKING:
    from fastapi.telemetry import TelemetryConfig

log = logging.getLogger(__name__)

_provider: Any = None
H = TypeVar("H", bound=Callable[[Any, Any], Awaitable[None]])
_tracer = trace.get_tracer("airoboros")


def _exporters_wanted(default_on: bool) -> list[str]:
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    raw = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if raw:
        return [e.strip() for e in raw.split(",") if e.strip() and e.strip() != "none"]
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    return ["otlp"] if default_on and endpoint else []


def setup(service: str, *, default_on: bool = True, exporter: Any = None) -> bool:
    """Record and export this process's spans. ``service`` is the default service name
    (``OTEL_SERVICE_NAME`` wins); ``default_on`` False (the CLI) exports only when
    ``OTEL_TRACES_EXPORTER`` says so; ``exporter`` (tests) receives every span as it ends.
    Returns whether spans are recorded. Safe to call more than once: later exporters are
    added to the same provider."""
    global _provider
    names = [] if exporter is not None else _exporters_wanted(default_on)
    if exporter is None and not names:
        return _provider is not None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
        )
    except ImportError:
        log.warning(
            "tracing asked for (%s) but opentelemetry-sdk is not installed; "
            "install airoboros[services]",
            ", ".join(names),
        )
        return False
    if _provider is None:
        attrs = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service}
        _provider = TracerProvider(resource=Resource.create(attrs))
        trace.set_tracer_provider(_provider)
        _instrument_httpx()
    if exporter is not None:
        _provider.add_span_processor(SimpleSpanProcessor(exporter))
    for name in names:
        if name == "otlp":
            protocol = os.environ.get(
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            )
            if protocol != "http/protobuf":
                log.warning("OTLP protocol %r is not supported; using http/protobuf", protocol)
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "console":
            _provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        else:
            log.warning("OTEL_TRACES_EXPORTER: unknown exporter %r ignored", name)
    return True


def _instrument_httpx() -> None:
    try:
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    except ImportError:
        return
    HTTPXClientInstrumentor().instrument()


_UNTRACED = frozenset({"/healthz", "/readyz", "/metrics"})


def _untraced(scope: MutableMapping[str, Any]) -> bool:
    return scope.get("path") in _UNTRACED


def fastapi() -> TelemetryConfig:
    """``FastAPI(telemetry=telemetry.fastapi())``: FastAPI traces its requests itself (a
    server span that continues the caller's ``traceparent``, named by route template)
    through the global provider that ``setup`` installs; the probes and /metrics are left
    out."""
    from fastapi.telemetry import TelemetryConfig

    return TelemetryConfig(exclude=_untraced)


# --- spans --------------------------------------------------------------------------------


def inject(headers: dict[str, Any]) -> dict[str, Any]:
    """Write the current context into ``headers`` (W3C traceparent/tracestate)."""
    propagate.inject(headers)
    return headers


def current_context() -> dict[str, str]:
    """The current context as headers, to be stored and continued later."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def _extract(headers: Mapping[str, Any] | None) -> otel_context.Context:
    carrier = {str(k): str(v) for k, v in (headers or {}).items() if isinstance(v, str | bytes)}
    return propagate.extract(carrier)


@contextlib.contextmanager
def span(
    name: str,
    *,
    parent: Mapping[str, Any] | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[trace.Span]:
    """A span, current inside the block; ``parent``: stored headers to continue from (else
    the current context). An exception marks it failed and goes on."""
    ctx = _extract(parent) if parent is not None else None
    with _tracer.start_as_current_span(
        name, context=ctx, kind=kind, attributes=dict(attributes or {})
    ) as s:
        yield s


def _message_attributes(message: Message) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "messaging.system": "rabbitmq",
        "messaging.destination.name": message.topic,
        "messaging.message.id": message.message_id,
    }
    job_id = getattr(message, "job_id", None)
    if job_id is not None:
        attrs["airoboros.job_id"] = job_id
    return attrs


@contextlib.contextmanager
def publishing(message: Message, headers: dict[str, Any]) -> Iterator[None]:
    """A producer span around the publication of ``message``; its context goes into
    ``headers`` (the ones that travel with the message)."""
    with _tracer.start_as_current_span(
        f"{message.topic} publish", kind=SpanKind.PRODUCER, attributes=_message_attributes(message)
    ):
        inject(headers)
        yield


@contextlib.contextmanager
def consuming(
    message: Message, headers: Mapping[str, Any] | None, delivery: int
) -> Iterator[trace.Span]:
    """A consumer span for the ``delivery``-th handling of ``message``, continuing the
    publisher's context from ``headers``."""
    with _tracer.start_as_current_span(
        f"{message.topic} process",
        context=_extract(headers),
        kind=SpanKind.CONSUMER,
        attributes={**_message_attributes(message), "airoboros.delivery": delivery},
    ) as s:
        yield s


def handles(action: str, service: str) -> Callable[[H], H]:
    """Decorates a handler method that takes one job message: it runs in a span named
    ``<action> <instructor>``, with the service, job and instructor as attributes."""

    def wrap(fn: H) -> H:
        @functools.wraps(fn)
        async def run(self: Any, msg: Any) -> None:
            with span(
                f"{action} {msg.instructor}",
                attributes={
                    "airoboros.service": service,
                    "airoboros.job_id": msg.job_id,
                    "airoboros.instructor": msg.instructor,
                },
            ):
                await fn(self, msg)

        return cast(H, run)

    return wrap


def log_ids() -> tuple[str, str] | None:
    """(trace id, span id) of the current span, for log lines; None outside a span."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")
