"""A minimal OpenTelemetry collector for tests: accepts OTLP/HTTP protobuf on
``POST /v1/traces`` (what the services' exporter sends) and keeps every span, decoded.

    with OtlpCollector() as col:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = col.url
        ...
        col.spans  # [Span(service, name, trace_id, span_id, parent_id, kind, attributes)]
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.asgi_server import AppServer

Scope = MutableMapping[str, Any]


@dataclass
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict[str, Any] = field(default_factory=dict)


def _value(v: Any) -> Any:
    which = v.WhichOneof("value")
    return getattr(v, which) if which else None


class _App:
    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()
        self.bad_requests = 0

    async def __call__(
        self,
        scope: Scope,
        receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
        send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ) -> None:
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        status = 200
        if scope["path"] == "/v1/traces" and scope["method"] == "POST":
            try:
                self._decode(body)
            except Exception:
                self.bad_requests += 1
                status = 400
        else:
            status = 404
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/x-protobuf")],
            }
        )
        await send({"type": "http.response.body", "body": b""})

    def _decode(self, body: bytes) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        out: list[Span] = []
        for rs in req.resource_spans:
            res = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    out.append(
                        Span(
                            service=str(res.get("service.name", "")),
                            name=s.name,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(),
                            kind=int(s.kind),
                            attributes={a.key: _value(a.value) for a in s.attributes},
                        )
                    )
        with self.lock:
            self.spans.extend(out)


class OtlpCollector(AppServer):
    def __init__(self) -> None:
        self.collected = _App()
        super().__init__(self.collected, lifespan="off")

    @property
    def spans(self) -> list[Span]:
        with self.collected.lock:
            return list(self.collected.spans)
