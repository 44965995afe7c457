"""The topics HTTP API (FastAPI): thin routes over TopicsService.

Every route but /healthz, /readyz and the web console's static files (/console/) needs
``Authorization: Bearer <key>`` with a key from AIROBOROS_API_KEYS (the OpenAPI spec and
its pages too, unless AIROBOROS_PUBLIC_DOCS):
a key sees the jobs it created, an admin key (AIROBOROS_ADMIN_API_KEYS) every job. Bodies
are ``airoboros.protocol``'s models. Errors use one shape, 5xx included:
{"error": {"message", "type", "param", "code", ...}} (``airoboros.web.error_response``); a
database, broker or object store outage is a 503 with Retry-After, never a lost request.

The web console's routes (docs/architecture.md, "The web console") are here too: rows
searched (``q``) and marked bad, ``GET /v1/experts`` (the adapter registry and the router's
pods) and ``POST /v1/playground/chat/completions``, passed to the router at
AIROBOROS_ROUTER_URL (``airoboros.topics.gateway``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.types import Receive, Scope, Send

from airoboros import metrics, telemetry
from airoboros.errors import (
    ApiError,
    ConfigError,
    PayloadTooLarge,
    ServiceUnavailable,
    Unauthorized,
)
from airoboros.parsing import load_config_body
from airoboros.protocol import (
    ERROR_RESPONSES,
    BadMark,
    ChatCompletionRequest,
    ConfigDocument,
    CullCreated,
    CullRequest,
    DocumentsUploaded,
    ExpertsPage,
    ItemRow,
    ItemsPage,
    JobCreated,
    JobList,
    JobReport,
    JobStatus,
    RoutedChatCompletion,
    TopicsGenerated,
    TopicsRequest,
    completion_responses,
)
from airoboros.settings import TopicsSettings
from airoboros.topics.gateway import RouterGateway, Upstream
from airoboros.web import (
    Principal,
    bearer_token,
    error_response,
    install_error_handlers,
    json_body,
    key_owner,
    read_body,
)

log = logging.getLogger(__name__)
#: the largest row sequence number (the items table's id is a 32-bit integer)
MAX_SEQ = 2**31 - 1
B = TypeVar("B", bound=BaseModel)


def config_body(model: type[ConfigDocument]) -> dict[str, Any]:
    """A posted config, YAML or JSON, declared so that the spec (and fuzzers) know the body.
    Either way the document is a mapping (a YAML one is dumped from it, not a string)."""
    schema = model.model_json_schema()
    example = schema.pop("examples")[0]
    content = {"schema": schema, "example": example}
    return {
        "requestBody": {
            "required": True,
            "description": "An airoboros config (docs: example-config.yaml), as YAML or JSON.",
            "content": {"application/json": content, "application/yaml": content},
        }
    }


CONFIG_BODY = config_body(ConfigDocument)
TOPICS_BODY = config_body(TopicsRequest)


def body_of(model: type[B], value: Any) -> B:
    """What a use case returned (a mapping, from TopicsService) as the declared body; a
    shape that does not fit is a bug of ours, and fails here rather than reaching a
    client."""
    if isinstance(value, model):
        return value
    return model.model_validate(value, from_attributes=not isinstance(value, Mapping))


#: Documents to upload: one or more files in the multipart field ``files``.
UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                }
            }
        },
    }
}
MAX_UPLOAD_FILES = 200

#: What an export answers: JSONL for every format but parquet (airoboros.exports).
EXPORT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The job's rows, streamed in the requested format.",
        "content": {
            "application/jsonl": {"schema": {"type": "string"}},
            "application/vnd.apache.parquet": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    **ERROR_RESPONSES,
}


class UpstreamResponse(StreamingResponse):
    """The router's streamed answer passed on, its connection released however the
    response ends (finished, client gone, cancelled)."""

    def __init__(self, upstream: Upstream) -> None:
        super().__init__(
            upstream.chunks(),
            status_code=upstream.status,
            headers={**upstream.headers, "cache-control": "no-cache"},
            media_type=upstream.media_type,
        )
        self.upstream = upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.upstream.aclose()


async def caller(request: Request) -> Principal:
    """Who is calling (401 without a valid key): the app's ``authenticate``."""
    principal: Principal = request.app.state.authenticate(request)
    return principal


Caller = Annotated[Principal, Depends(caller)]


def create_app(settings: TopicsSettings, *, service: Any = None) -> FastAPI:
    """The composition root of the topics process. ``service`` may be given by tests."""
    keys = [k.encode() for k in settings.api_key_list()]
    if not keys:
        raise ConfigError(["AIROBOROS_API_KEYS: set at least one API key for the topics API"])
    state: dict[str, Any] = {"ready": False, "service": service}
    # The console's router (playground, pods): the operator's URL, never a client's.
    gateway = RouterGateway(settings.router_base(), settings.router_key())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from airoboros.store import make_store
        from airoboros.topics.service import GROUP, PIPELINE_QUEUES, TopicsService
        from airoboros.worker import make_bus, make_objects

        if state["service"] is not None:
            state["ready"] = True
            try:
                yield
            finally:
                await gateway.aclose()
            return
        store = make_store(settings.database_url)
        await store.connect(migrate=False)
        bus = make_bus(settings)
        objects = make_objects(settings)
        from redis.asyncio import Redis

        from airoboros.jobboard import RedisJobBoard

        redis = Redis.from_url(settings.redis_url)
        svc = TopicsService(
            settings, store, bus, objects, board=RedisJobBoard(redis, settings.redis_prefix)
        )
        from airoboros.contracts import BatchCompleted, CallsDeferred, CandidatesScreened

        bus.subscribe(BatchCompleted, svc.on_completed, concurrency=4, group=GROUP)
        bus.subscribe(CandidatesScreened, svc.on_screened, concurrency=4, group=GROUP)
        bus.subscribe(CallsDeferred, svc.on_deferred, concurrency=2, group=GROUP)
        stop = asyncio.Event()
        await bus.start()
        for message_type, group in PIPELINE_QUEUES:
            await bus.ensure_queue(message_type, group=group)
        dlqs = [f"{q}.dlq" for t, g in PIPELINE_QUEUES for q in bus.queue_names(t, g)]
        await bus.consume_dead_letters(svc.on_dead_letter, queues=dlqs)
        ticker = asyncio.create_task(svc.run_ticks(stop))
        state["service"] = svc
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False
            stop.set()
            await ticker
            for ctl in list(svc.controllers.values()):
                if ctl.lane is not None:  # batch jobs stay open for whoever takes the job
                    await ctl.lane.stop(cancel_open=False)
            await bus.close()
            await redis.aclose()
            await store.close()
            await gateway.aclose()

    app = FastAPI(
        title="airoboros topics",
        version="1",
        description="Dataset generation jobs: post a config, follow it, fetch the rows.",
        lifespan=lifespan,
        telemetry=telemetry.fastapi(),
        # The spec and its pages are served below, behind the key unless opened.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    metrics.instrument(app)
    admins = [k.encode() for k in settings.admin_key_list()]
    limit = settings.max_body_bytes

    def svc() -> Any:
        s = state["service"]
        if s is None:
            raise ServiceUnavailable("starting", code="unavailable")
        return s

    def authenticate(request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        key = bearer_token(header, keys + admins)
        if key is None:
            raise Unauthorized(
                "missing or invalid API key (Authorization: Bearer <key>)", code="unauthorized"
            )
        return Principal(key_owner(key), admin=bearer_token(header, admins) is not None)

    app.state.authenticate = authenticate

    # Every error is the tree's, answered by its class (airoboros.errors: status, code) in
    # the one envelope (airoboros.web.error_response).
    install_error_handlers(
        app,
        name="topics",
        internal_message=lambda exc: "internal error; the service's log has the details",
    )

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        invalid = ApiError(
            "; ".join(problems), status=422, code="invalid_request", details={"problems": problems}
        )
        return error_response(invalid)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        s = state["service"]
        if state["ready"] and s is not None and await s.ready():
            return JSONResponse({"status": "ready"})
        status = "starting" if not state["ready"] else "a dependency is down"
        return JSONResponse({"status": status}, status_code=503)

    # --- the spec and its pages ------------------------------------------------------------
    open_docs = [] if settings.public_docs else [Depends(caller)]

    @app.get("/openapi.json", include_in_schema=False, dependencies=open_docs)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=open_docs)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=app.title)

    @app.get("/redoc", include_in_schema=False, dependencies=open_docs)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=app.title)

    async def read_config(request: Request) -> Any:
        """The body as a config: its size capped before it is read (413), YAML without
        aliases and JSON, both with depth and size limits (airoboros.parsing)."""
        too_large = PayloadTooLarge(f"body larger than {limit} bytes", code="too_large")
        body = await read_body(request, limit, too_large)
        config = load_config_body(body, request.headers.get("content-type", ""))
        if not isinstance(config, dict):  # a document of null, a list or a scalar
            kind = "null" if config is None else type(config).__name__
            raise ConfigError([f"(body): a config is a mapping of keys, not {kind}"])
        return config

    # --- jobs ------------------------------------------------------------------------------
    @app.post("/v1/jobs", status_code=201, openapi_extra=CONFIG_BODY, responses=ERROR_RESPONSES)
    async def create_job(request: Request, who: Caller) -> JobCreated:
        return body_of(JobCreated, await svc().create_job(await read_config(request), who))

    @app.get("/v1/jobs", responses=ERROR_RESPONSES)
    async def list_jobs(who: Caller) -> JobList:
        return JobList(data=await svc().list_jobs(who))

    @app.get("/v1/jobs/{job_id}", responses=ERROR_RESPONSES)
    async def get_job(job_id: str, who: Caller) -> JobStatus:
        return body_of(JobStatus, await svc().status(job_id, who))

    @app.post("/v1/jobs/{job_id}/cull", status_code=201, responses=ERROR_RESPONSES)
    async def cull_job(job_id: str, who: Caller, body: CullRequest | None = None) -> CullCreated:
        """Cull a finished job's rows into a new job (docs/culling.md)."""
        return body_of(CullCreated, await svc().cull(job_id, body or CullRequest(), who))

    @app.post("/v1/jobs/{job_id}/cancel", responses=ERROR_RESPONSES)
    async def cancel_job(job_id: str, who: Caller) -> JobStatus:
        return body_of(JobStatus, await svc().cancel(job_id, who))

    @app.post("/v1/jobs/{job_id}/resume", responses=ERROR_RESPONSES)
    async def resume_job(job_id: str, who: Caller) -> JobStatus:
        """Run a stopped (incomplete, failed or cancelled) job again from its counts."""
        return body_of(JobStatus, await svc().resume(job_id, who))

    @app.post("/v1/jobs/{job_id}/export", responses=ERROR_RESPONSES)
    async def export_job(job_id: str, who: Caller) -> JobStatus:
        """Write a finished job's export to the object store again (or for the first time,
        when the store was down when the job ended)."""
        return body_of(JobStatus, await svc().export_again(job_id, who))

    @app.get("/v1/jobs/{job_id}/items", responses=ERROR_RESPONSES)
    async def items(
        job_id: str,
        who: Caller,
        category: str | None = Query(None, max_length=64),
        after: int = Query(0, ge=0, le=MAX_SEQ),
        limit: int = Query(100, ge=1, le=1000),
        q: str | None = Query(
            None,
            min_length=1,
            max_length=200,
            description="only rows whose instruction, response or system contains this "
            "text, in any case (taken literally: % and _ are no wildcards)",
        ),
    ) -> ItemsPage:
        """A page of the job's rows, in order; rows marked bad are listed (``bad: true``)
        so that they can be unmarked."""
        page = await svc().items(job_id, who, category=category, after=after, limit=limit, q=q)
        return body_of(ItemsPage, page)

    @app.post("/v1/jobs/{job_id}/items/{seq}/bad", responses=ERROR_RESPONSES)
    async def mark_bad(
        job_id: str, body: BadMark, who: Caller, seq: int = Path(ge=0, le=MAX_SEQ)
    ) -> ItemRow:
        """Mark a row bad (``{"bad": true}``: left out of every export and cull, kept in
        the store) or good again (``{"bad": false}``)."""
        return body_of(ItemRow, await svc().mark_bad(job_id, seq, body.bad, who))

    @app.get("/v1/jobs/{job_id}/report", responses=ERROR_RESPONSES)
    async def report(job_id: str, who: Caller) -> JobReport:
        """The job's quality report: per category, where its items went, dedupe yield,
        diversity of the kept instructions, cost per kept row, tokens that bought
        nothing (docs/report.md). Computed from the store on each call."""
        from airoboros.report import build_report

        s = svc()
        await s.job(job_id, who)  # the same 404 for no job and another owner's
        return await build_report(s.store, job_id)

    @app.get(
        "/v1/jobs/{job_id}/export", response_class=StreamingResponse, responses=EXPORT_RESPONSES
    )
    async def export(
        job_id: str,
        who: Caller,
        format: str = Query(
            "airoboros",
            description="airoboros (alias jsonl), sharegpt, alpaca, openai or parquet; "
            "see docs/exports.md",
        ),
    ) -> Any:
        from airoboros.exports import export_filename, media_type, resolve_format

        fmt = resolve_format(format)  # UnknownFormat: 400 naming the valid formats
        s = svc()
        await s.job(job_id, who)  # 404 before the stream starts
        return StreamingResponse(
            s.export_stream(job_id, fmt),
            media_type=media_type(fmt),
            headers={
                "content-disposition": f'attachment; filename="{export_filename(job_id, fmt)}"'
            },
        )

    # --- the console: experts, pods and the playground ----------------------------------------
    @app.get("/v1/experts", responses=ERROR_RESPONSES)
    async def experts(request: Request, who: Caller) -> ExpertsPage:
        """The trained expert versions the key may see (an admin key: all; another: those
        trained on its own jobs) and the router's pods with the adapters each holds. A
        router that cannot be asked gives ``pods_error``, not an error answer."""
        versions = await svc().experts(who)
        pods, error = await gateway.pods(request.headers.get("authorization", ""))
        return ExpertsPage.model_validate(
            {"data": versions, "pods": pods, "router": gateway.base_url, "pods_error": error}
        )

    @app.post(
        "/v1/playground/chat/completions",
        openapi_extra=json_body(ChatCompletionRequest),
        responses=completion_responses(RoutedChatCompletion),
    )
    async def playground(request: Request, who: Caller) -> Response:
        """A chat completion through the configured router (AIROBOROS_ROUTER_URL), the
        body passed as it is: streamed back event by event with ``stream: true``; the
        router's status, errors and ``x-airoboros-expert`` header passed back. 503 when no
        router is configured or it cannot be reached."""
        too_large = PayloadTooLarge(f"body larger than {limit} bytes", code="too_large")
        body = await read_body(request, limit, too_large)
        upstream = await gateway.chat(body, request.headers.get("authorization", ""))
        if upstream.streamed:
            return UpstreamResponse(upstream)
        content = await upstream.read()
        return Response(
            content,
            status_code=upstream.status,
            media_type=upstream.media_type,
            headers=upstream.headers,
        )

    # --- documents ---------------------------------------------------------------------------
    @app.post(
        "/v1/documents", status_code=201, openapi_extra=UPLOAD_BODY, responses=ERROR_RESPONSES
    )
    async def upload_documents(request: Request, who: Caller) -> DocumentsUploaded:
        """Documents for the ``documents`` instructor: .txt, .md or .pdf files (multipart,
        field ``files``), kept in the object store; a job names the upload by the ``id``
        returned here (``instructors.documents.documents_upload``)."""
        most = settings.max_upload_bytes
        body = await read_body(
            request, most, PayloadTooLarge(f"upload larger than {most} bytes", code="too_large")
        )

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, receive).form(
                max_files=MAX_UPLOAD_FILES, max_fields=4, max_part_size=most
            )
        except Exception as exc:  # a malformed multipart body (or too many parts)
            raise ConfigError([f"(body): not a usable multipart upload ({exc})"]) from None
        files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        return body_of(DocumentsUploaded, await svc().upload_documents(files, who))

    @app.post("/v1/topics:generate", openapi_extra=TOPICS_BODY, responses=ERROR_RESPONSES)
    async def topics_generate(request: Request, who: Caller) -> TopicsGenerated:
        topics = await svc().generate_topics(await read_config(request))
        return TopicsGenerated(topics=topics, count=len(topics))

    # --- the web console (static files; its data calls are the routes above) ----------------
    from airoboros.topics.console_files import mount_console

    mount_console(app)
    return app
