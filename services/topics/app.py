"""The topics HTTP API (FastAPI): thin routes over TopicsService.

Every route but /healthz and /readyz needs ``Authorization: Bearer <key>`` with a key from
AIROBOROS_API_KEYS. Errors use one shape: {"error": {"message", "type", "code", ...}}.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import yaml
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from airoboros import metrics, telemetry
from airoboros.errors import AiroborosError, ConfigError, NotFoundError
from airoboros.settings import TopicsSettings
from airoboros.topics.cull import CullRequest, JobNotFinished
from airoboros.topics.service import JobConflict
from airoboros.web import bearer_token

log = logging.getLogger(__name__)
MAX_BODY = 2 * 1024 * 1024


def error(status: int, message: str, code: str, **extra: Any) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": code, **extra}}, status_code=status
    )


def create_app(settings: TopicsSettings, *, service: Any = None) -> FastAPI:
    """The composition root of the topics process. ``service`` may be given by tests."""
    keys = [k.encode() for k in settings.api_key_list()]
    if not keys:
        raise ConfigError(["AIROBOROS_API_KEYS: set at least one API key for the topics API"])
    state: dict[str, Any] = {"ready": False, "service": service}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from airoboros.store import SqlStore
        from airoboros.topics.service import GROUP, PIPELINE_QUEUES, TopicsService
        from airoboros.worker import make_bus, make_objects

        if state["service"] is not None:
            state["ready"] = True
            yield
            return
        store = SqlStore(settings.database_url)
        await store.connect(migrate=False)
        bus = make_bus(settings)
        objects = make_objects(settings)
        svc = TopicsService(settings, store, bus, objects)
        from airoboros.contracts import BatchCompleted, CandidatesScreened

        bus.subscribe(BatchCompleted, svc.on_completed, concurrency=4, group=GROUP)
        bus.subscribe(CandidatesScreened, svc.on_screened, concurrency=4, group=GROUP)
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
            await bus.close()
            await store.close()

    app = FastAPI(
        title="airoboros topics",
        version="1",
        description="Dataset generation jobs: post a config, follow it, fetch the rows.",
        lifespan=lifespan,
        telemetry=telemetry.fastapi(),
    )
    metrics.instrument(app)

    def svc() -> Any:
        s = state["service"]
        if s is None:
            raise HTTPException(503, "starting")
        return s

    async def auth(request: Request) -> None:
        if bearer_token(request.headers.get("authorization", ""), keys) is None:
            raise HTTPException(401, "missing or invalid API key (Authorization: Bearer <key>)")

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        code = {401: "unauthorized", 404: "not_found", 413: "too_large", 503: "unavailable"}
        return error(exc.status_code, str(exc.detail), code.get(exc.status_code, "error"))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return error(422, "; ".join(problems), "invalid_request", problems=problems)

    @app.exception_handler(ConfigError)
    async def config_error(_: Request, exc: ConfigError) -> JSONResponse:
        return error(422, str(exc), exc.code, problems=exc.problems)

    @app.exception_handler(JobNotFinished)
    @app.exception_handler(JobConflict)
    async def conflict(_: Request, exc: AiroborosError) -> JSONResponse:
        return error(409, str(exc), exc.code)

    @app.exception_handler(NotFoundError)
    async def not_found(_: Request, exc: NotFoundError) -> JSONResponse:
        return error(404, str(exc), exc.code)

    @app.exception_handler(AiroborosError)
    async def other_error(_: Request, exc: AiroborosError) -> JSONResponse:
        return error(400, str(exc), exc.code)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        if state["ready"]:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "starting"}, status_code=503)

    guarded = [Depends(auth)]

    async def read_config(request: Request) -> Any:
        body = await request.body()
        if len(body) > MAX_BODY:
            raise HTTPException(413, f"body larger than {MAX_BODY} bytes")
        if not body.strip():
            raise ConfigError(["(body): empty; send the config as YAML or JSON"])
        try:
            if "json" in request.headers.get("content-type", ""):
                return json.loads(body)
            return yaml.safe_load(body)
        except (ValueError, yaml.YAMLError) as exc:
            raise ConfigError([f"(body): not valid YAML or JSON ({exc})"]) from None

    @app.post("/v1/jobs", status_code=201, dependencies=guarded)
    async def create_job(request: Request) -> Any:
        return await svc().create_job(await read_config(request))

    @app.get("/v1/jobs", dependencies=guarded)
    async def list_jobs() -> Any:
        return {"data": await svc().list_jobs()}

    @app.get("/v1/jobs/{job_id}", dependencies=guarded)
    async def get_job(job_id: str) -> Any:
        return await svc().status(job_id)

    @app.post("/v1/jobs/{job_id}/cull", status_code=201, dependencies=guarded)
    async def cull_job(job_id: str, body: CullRequest | None = None) -> Any:
        """Cull a finished job's rows into a new job (docs/culling.md)."""
        return await svc().cull(job_id, body or CullRequest())

    @app.post("/v1/jobs/{job_id}/cancel", dependencies=guarded)
    async def cancel_job(job_id: str) -> Any:
        return await svc().cancel(job_id)

    @app.post("/v1/jobs/{job_id}/resume", dependencies=guarded)
    async def resume_job(job_id: str) -> Any:
        """Run a stopped (incomplete, failed or cancelled) job again from its counts."""
        return await svc().resume(job_id)

    @app.get("/v1/jobs/{job_id}/items", dependencies=guarded)
    async def items(
        job_id: str,
        category: str | None = None,
        after: int = Query(0, ge=0),
        limit: int = Query(100, ge=1, le=1000),
    ) -> Any:
        return await svc().items(job_id, category=category, after=after, limit=limit)

    @app.get("/v1/jobs/{job_id}/export", dependencies=guarded)
    async def export(
        job_id: str,
        format: str = Query(
            "airoboros",
            description="airoboros (alias jsonl), sharegpt, alpaca, openai or parquet; "
            "see docs/exports.md",
        ),
    ) -> Any:
        from airoboros.exports import export_filename, media_type, resolve_format

        fmt = resolve_format(format)  # UnknownFormat: 400 naming the valid formats
        s = svc()
        await s.store.get_job(job_id)  # 404 before the stream starts
        return StreamingResponse(
            s.export_stream(job_id, fmt),
            media_type=media_type(fmt),
            headers={
                "content-disposition": f'attachment; filename="{export_filename(job_id, fmt)}"'
            },
        )

    @app.post("/v1/topics:generate", dependencies=guarded)
    async def topics_generate(request: Request) -> Any:
        topics = await svc().generate_topics(await read_config(request))
        return {"topics": topics, "count": len(topics)}

    return app
