"""The router's HTTP edge (FastAPI): OpenAI's ``/v1/models``, ``/v1/chat/completions`` and
``/v1/completions`` in front of ``RouterService``, and ``/v1/pods`` (the backends and the
adapters each holds, for the web console).

Guards, in order: API key (``Authorization: Bearer``, 401), rate limit per key (429 with
Retry-After), body size (413). Every error is OpenAI's envelope ``{"error": {"message",
"type", "param", "code"}}`` with ``x-should-retry`` set deliberately (the SDK retries
408/409/429/5xx unless told otherwise).

``create_app(settings, router=None, backends=None)`` is the composition root; a router
and a backend pool built elsewhere (one process serving router and inference together,
tests) can be passed in, and are then started and closed by their owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from airoboros import metrics, telemetry
from airoboros.errors import PayloadTooLarge, RateLimited, Unauthorized
from airoboros.ports import Embedder
from airoboros.protocol import (
    ERROR_RESPONSES,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    PodList,
    PodStatus,
    RoutedChatCompletion,
    RoutedTextCompletion,
    completion_responses,
)
from airoboros.router.agent import AgentRouter
from airoboros.router.backends import BackendPool, Stream
from airoboros.router.limits import ClientRateLimiter
from airoboros.router.package import Reader
from airoboros.router.routing import Router
from airoboros.router.service import Kind, RouterService
from airoboros.router.settings import RouterSettings
from airoboros.web import (
    bearer_token,
    install_error_handlers,
    json_body,
    read_body,
)

log = logging.getLogger(__name__)
#: seconds a backend's last check stays fresh enough for ``GET /v1/pods``
PODS_FRESH = 2.0


class ProxyStreamingResponse(StreamingResponse):
    """Streams a backend's events and releases the backend connection however the response
    ends (finished, client gone, cancelled)."""

    def __init__(self, stream: Stream, headers: dict[str, str]) -> None:
        super().__init__(
            stream.events(),
            status_code=stream.status,
            headers=headers,
            media_type=stream.media_type,
        )
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.stream.aclose()


def make_reader(settings: RouterSettings) -> Reader:
    def store_for(bucket: str) -> Any:
        from airoboros.objects_s3 import make_object_store

        return make_object_store(
            f"s3://{bucket}",
            endpoint=settings.s3_endpoint,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            secure=settings.s3_secure,
        )

    return Reader(store_for)


def make_router(settings: RouterSettings, embedder: Embedder) -> Router:
    return Router(
        embedder,
        k=settings.router_k,
        max_samples=settings.router_max_samples,
        rule=settings.routing_rule,
        temperature=settings.vote_temperature,
        seed=settings.seed,
        reader=make_reader(settings),
    )


def create_app(
    settings: RouterSettings,
    router: Router | None = None,
    backends: BackendPool | None = None,
    *,
    embedder: Embedder | None = None,
) -> FastAPI:
    """The router process. Without ``router``, one is built on ``embedder`` (default: the
    settings' sentence-transformers model, loaded after start-up so /healthz answers at
    once) and the ``lmoe`` package is loaded into it; ``adapter.published`` events from
    the broker add experts while it runs (``bus``)."""
    keys = [k.encode() for k in settings.api_key_list()]
    if not keys:
        log.warning("AIROBOROS_API_KEYS is empty: the router accepts requests without a key")
    if backends is None and not settings.backend_list():
        log.warning("AIROBOROS_BACKENDS is empty: every completion will get a 503")
    pool = backends or BackendPool(
        settings.backend_list(),
        api_key=settings.backend_api_key,
        connect_timeout=settings.backend_connect_timeout,
        read_timeout=settings.backend_read_timeout,
        health_interval=settings.health_interval,
        affinity_slack=settings.affinity_slack,
    )
    agent = (
        AgentRouter(
            pool.complete_json, expert=settings.agent_expert, timeout=settings.agent_timeout
        )
        if settings.agent_router
        else None
    )
    service = RouterService(
        pool,
        router if router is not None and not settings.lmoe else None,
        agent=agent,
        base_models=settings.base_model_list(),
        default_expert=settings.default_expert,
        routing_max_chars=settings.routing_max_chars,
    )
    limiter = ClientRateLimiter(settings.rate_limit_per_minute)
    state: dict[str, Any] = {"ready": service.router is not None, "bus": None, "bus_started": False}

    async def load() -> Router | None:
        r = router
        if r is None:
            try:
                emb = embedder if embedder is not None else await load_embedder()
            except Exception as exc:
                service.loading_error = f"embedding model: {exc}"
                log.exception("router: could not load the embedding model")
                return None
            r = make_router(settings, emb)
        try:
            if settings.lmoe:
                names = await r.load_package(settings.lmoe)
                log.info(
                    "router: %d expert(s) from %s: %s", len(names), settings.lmoe, ", ".join(names)
                )
            state["ready"] = True
        except Exception as exc:
            service.loading_error = f"{type(exc).__name__}: {exc}"
            log.exception("router: could not load the LMoE package %s", settings.lmoe)
        service.router = r
        return r

    async def load_embedder() -> Embedder:
        from airoboros.embeddings import SentenceTransformerEmbedder

        if settings.embedding_threads:
            import torch

            torch.set_num_threads(settings.embedding_threads)
        return await asyncio.to_thread(
            SentenceTransformerEmbedder,
            settings.embedding_model,
            settings.embedding_device,
            dtype=settings.embedding_dtype,
        )

    async def run_bus(r: Router) -> None:
        from airoboros.contracts import AdapterPublished
        from airoboros.worker import make_bus

        while True:
            bus = make_bus(settings)
            bus.subscribe(
                AdapterPublished, r.on_adapter_published, concurrency=1, group=settings.bus_group
            )
            try:
                await bus.start()
            except Exception as exc:
                log.warning("router: broker unavailable (%s); experts are not updated live", exc)
                with contextlib.suppress(Exception):
                    await bus.close()
                await asyncio.sleep(10)
                continue
            state["bus"] = bus
            state["bus_started"] = True
            log.info("router: consuming adapter.published as %r", settings.bus_group)
            return

    async def rescan(r: Router) -> None:
        while True:
            await asyncio.sleep(settings.rescan_interval)
            try:
                await r.load_package(settings.lmoe)
                state["ready"] = True
                service.loading_error = None
            except Exception:
                log.exception("router: rereading %s failed", settings.lmoe)

    async def start_all() -> None:
        r = service.router if service.router is not None else await load()
        if r is None:
            return
        if settings.bus:
            tasks.append(asyncio.create_task(run_bus(r)))
        if settings.rescan_interval and settings.lmoe:
            tasks.append(asyncio.create_task(rescan(r)))

    tasks: list[asyncio.Task[None]] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if backends is None:
            await pool.start()
        tasks.append(asyncio.create_task(start_all()))
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(BaseException):
                    await t
            if state["bus"] is not None:
                await state["bus"].close()
            if backends is None:
                await pool.close()

    app = FastAPI(
        title="airoboros router",
        version="1",
        description="OpenAI-compatible front door: routes each request to the best expert.",
        lifespan=lifespan,
        telemetry=telemetry.fastapi(),
    )
    metrics.instrument(app)
    app.state.service = service
    app.state.router_state = state

    install_error_handlers(
        app,
        name="router",
        internal_message=lambda exc: f"internal error ({type(exc).__name__})",
    )

    def authenticate(request: Request) -> str:
        """The caller's identity for the rate limit: its key, or its address."""
        if not keys:
            return request.client.host if request.client else "?"
        token = bearer_token(request.headers.get("authorization", ""), keys)
        if token is None:
            raise Unauthorized(
                "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'"
            )
        return token

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        body = {
            "status": "ready" if state["ready"] else "starting",
            "experts": len(service.experts()),
            "bus": state["bus_started"],
            "backends": [
                {"url": b.url, "healthy": b.healthy, "outstanding": b.outstanding}
                for b in pool.backends
            ],
        }
        if service.loading_error:
            body["error"] = service.loading_error
        return JSONResponse(body, status_code=200 if state["ready"] else 503)

    @app.get("/v1/models", responses=ERROR_RESPONSES)
    async def list_models(request: Request) -> ModelList:
        authenticate(request)
        return ModelList(data=service.models())

    @app.get("/v1/models/{name:path}", responses=ERROR_RESPONSES)
    async def get_model(name: str, request: Request) -> ModelCard:
        authenticate(request)
        return service.model(name)

    @app.get("/v1/pods", responses=ERROR_RESPONSES)
    async def list_pods(request: Request) -> PodList:
        """The backends (inference pods) and what each holds: its url, health, requests in
        flight through this router, and the adapters its ``GET /v1/models`` lists (or it
        answered for). Checked again first when the last check is older than
        ``PODS_FRESH`` seconds (the web console's experts page)."""
        authenticate(request)
        now = time.monotonic()
        if any(now - b.checked_at > PODS_FRESH for b in pool.backends):
            await pool.refresh()
        return PodList(
            data=[
                PodStatus(
                    url=b.url,
                    healthy=b.healthy,
                    outstanding=b.outstanding,
                    adapters=b.adapters,
                    models=None if b.models is None else sorted(b.models),
                    error=b.error or None,
                )
                for b in pool.backends
            ]
        )

    async def complete(kind: Kind, request: Request) -> Response:
        who = authenticate(request)
        wait = limiter.check(who)
        if wait is not None:
            raise RateLimited(
                f"Rate limit reached: {settings.rate_limit_per_minute} requests per minute "
                f"per key; retry in {wait:.1f}s",
                headers={"retry-after": str(max(1, round(wait + 0.5)))},
            )
        limit = settings.max_body_bytes
        too_large = PayloadTooLarge(
            f"the request body is larger than {limit} bytes", code="request_too_large"
        )
        body = await read_body(request, limit, too_large)
        prepared = await service.prepare(kind, body)
        if prepared.stream:
            stream = await service.stream(prepared)
            return ProxyStreamingResponse(
                stream, {**stream.headers, **prepared.headers(), "cache-control": "no-cache"}
            )
        reply = await service.complete(prepared)
        return Response(
            reply.content,
            status_code=reply.status,
            media_type="application/json",
            headers={**reply.headers, **prepared.headers()},
        )

    @app.post(
        "/v1/chat/completions",
        openapi_extra=json_body(ChatCompletionRequest),
        responses=completion_responses(RoutedChatCompletion),
    )
    async def chat_completions(request: Request) -> Response:
        return await complete("chat", request)

    @app.post(
        "/v1/completions",
        openapi_extra=json_body(CompletionRequest),
        responses=completion_responses(RoutedTextCompletion),
    )
    async def completions(request: Request) -> Response:
        return await complete("completions", request)

    return app
