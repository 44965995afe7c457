"""The inference HTTP API (FastAPI): OpenAI's /v1/models, /v1/chat/completions and
/v1/completions, plus /v1/adapters to load and unload adapters at run time.

Routes parse, call ``InferenceService`` and translate errors into OpenAI's envelope
``{"error": {"message", "type", "param", "code"}}``. When AIROBOROS_API_KEYS is set, every
/v1 route needs ``Authorization: Bearer <key>``; otherwise the API is open (it is meant to
sit behind the router).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from airoboros import metrics, telemetry
from airoboros.errors import (
    BackendFailure,
    ConfigError,
    InvalidRequest,
    PayloadTooLarge,
    Unauthorized,
)
from airoboros.inference.adapters import check_name
from airoboros.inference.backend import GenerationBackend
from airoboros.inference.service import InferenceService
from airoboros.inference.settings import InferenceSettings
from airoboros.protocol import (
    ERROR_RESPONSES,
    AdapterCard,
    AdapterList,
    AdapterLoadRequest,
    ChatCompletion,
    ChatCompletionRequest,
    CompletionRequest,
    DeletedModel,
    ModelCard,
    ModelList,
    TextCompletion,
    completion_responses,
)
from airoboros.web import (
    bearer_token,
    error_response,
    install_error_handlers,
    json_body,
    read_body,
)

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)


def make_backend(settings: InferenceSettings) -> GenerationBackend:
    """The configured backend (not started). Raises ``ConfigError`` for settings that
    cannot work, before anything is loaded."""
    if settings.backend == "tgi":
        from airoboros.inference.tgi import TGIBackend

        if not settings.tgi_url:
            raise ConfigError(["AIROBOROS_TGI_URL: the TGI backend needs the server's URL"])
        return TGIBackend(settings)
    from airoboros.inference.engine import LocalEngine

    if not settings.base_model or not Path(settings.base_model).is_dir():
        raise ConfigError(
            [
                f"AIROBOROS_BASE_MODEL: {settings.base_model!r} is not a local model folder "
                "(models are never downloaded here)"
            ]
        )
    return LocalEngine(settings)


def parse(model: type[M], body: bytes) -> M:
    if not body.strip():
        raise InvalidRequest("the request body is empty: send a JSON object")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": str(exc)}
        loc = ".".join(str(p) for p in first["loc"]) or None
        if first.get("type") == "json_invalid":
            raise InvalidRequest(f"the request body is not valid JSON: {first['msg']}") from None
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors[:5]
        )
        raise InvalidRequest(problems, param=loc) from None


def create_app(settings: InferenceSettings, engine: GenerationBackend | None = None) -> FastAPI:
    """The composition root of the inference process. ``engine`` may be given by tests;
    it is started with the app and closed with it."""
    backend = engine if engine is not None else make_backend(settings)
    service = InferenceService(backend, settings)
    keys = [k.encode() for k in settings.api_key_list()]
    if not keys:
        log.warning(
            "AIROBOROS_API_KEYS is empty: the inference service accepts requests without a key"
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await backend.start()
        bus: Any = None
        if settings.subscribe_adapters:
            from airoboros.contracts import AdapterPublished
            from airoboros.worker import make_bus

            bus = make_bus(settings)
            # Every replica needs every announcement: one group (queue) per replica.
            group = settings.adapter_events_group or f"inference-{socket.gethostname()}"
            bus.subscribe(AdapterPublished, service.on_adapter_published, group=group)
            await bus.start()
            log.info("subscribed to adapter.published as %s", group)
        try:
            yield
        finally:
            if bus is not None:
                await bus.close()
            await backend.close()

    app = FastAPI(
        title="airoboros inference",
        version="1",
        description="OpenAI-compatible generation with one base model and many LoRA experts.",
        lifespan=lifespan,
        telemetry=telemetry.fastapi(),
    )
    metrics.instrument(app)
    app.state.service = service
    app.state.backend = backend

    install_error_handlers(
        app,
        name="inference",
        internal_message=lambda exc: f"internal error: {type(exc).__name__}",
        internal=BackendFailure,
    )

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return error_response(InvalidRequest(problems))

    def authorize(request: Request) -> None:
        if not keys:
            return
        if bearer_token(request.headers.get("authorization", ""), keys) is None:
            raise Unauthorized("missing or invalid API key (Authorization: Bearer <key>)")

    async def body_of(request: Request, model: type[M]) -> M:
        authorize(request)
        limit = settings.max_body_bytes
        too_large = PayloadTooLarge(f"the request body is larger than {limit} bytes")
        return parse(model, await read_body(request, limit, too_large))

    def respond(result: BaseModel | AsyncIterator[str]) -> Response:
        if isinstance(result, BaseModel):
            return Response(result.model_dump_json(), media_type="application/json")
        return StreamingResponse(
            result,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def unless_gone(request: Request, work: Any) -> Any:
        """Run ``work`` (a non-streamed generation), cancelling it if the client leaves."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=1.0)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    task.cancel()
                    return None
        finally:
            if not task.done():
                task.cancel()

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        if backend.ready():
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "starting"}, status_code=503)

    @app.get("/v1/models", responses=ERROR_RESPONSES)
    async def models(request: Request) -> ModelList:
        authorize(request)
        return service.models()

    @app.get("/v1/models/{model_id}", responses=ERROR_RESPONSES)
    async def model(request: Request, model_id: str) -> ModelCard:
        authorize(request)
        return service.model(model_id)

    @app.post(
        "/v1/chat/completions",
        openapi_extra=json_body(ChatCompletionRequest),
        responses=completion_responses(ChatCompletion),
    )
    async def chat(request: Request) -> Response:
        req = await body_of(request, ChatCompletionRequest)
        if req.stream:
            return respond(await service.chat(req))
        result = await unless_gone(request, service.chat(req))
        return Response(status_code=499) if result is None else respond(result)

    @app.post(
        "/v1/completions",
        openapi_extra=json_body(CompletionRequest),
        responses=completion_responses(TextCompletion),
    )
    async def completions(request: Request) -> Response:
        req = await body_of(request, CompletionRequest)
        if req.stream:
            return respond(await service.completion(req))
        result = await unless_gone(request, service.completion(req))
        return Response(status_code=499) if result is None else respond(result)

    @app.get("/v1/adapters", responses=ERROR_RESPONSES)
    async def list_adapters(request: Request) -> AdapterList:
        authorize(request)
        return service.adapters()

    @app.post(
        "/v1/adapters", openapi_extra=json_body(AdapterLoadRequest), responses=ERROR_RESPONSES
    )
    async def add_adapter(request: Request) -> AdapterCard:
        req = await body_of(request, AdapterLoadRequest)
        return await service.add_adapter(req)

    @app.delete("/v1/adapters/{name}", responses=ERROR_RESPONSES)
    async def remove_adapter(request: Request, name: str) -> DeletedModel:
        authorize(request)
        check_name(name)
        return await service.remove_adapter(name)

    return app
