"""What the HTTP APIs (topics, router, inference) share at their edge: the API-key check,
the size-limited request body, and the one translation of errors into OpenAI's envelope
(``error_response``), so that every API answers every error in the same shape."""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from airoboros.errors import (
    AiroborosError,
    ApiError,
    InternalError,
    ServiceUnavailable,
    is_unavailable,
)
from airoboros.protocol import error_body

if TYPE_CHECKING:
    from starlette.responses import JSONResponse

log = logging.getLogger(__name__)

#: seconds a client is told to wait (Retry-After) when a 503 names no time of its own
RETRY_AFTER = 5
#: the codes of the web framework's own errors (no route, wrong method)
ROUTE_CODES = {404: "not_found", 405: "method_not_allowed"}


def bearer_token(authorization: str, keys: Sequence[bytes]) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header when it is one of ``keys``,
    else None. Every key is compared, each in constant time."""
    scheme, _, token = authorization.partition(" ")
    given = token.strip().encode()
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(given, k)
    return token.strip() if ok and scheme.lower() == "bearer" else None


@dataclass(frozen=True)
class Principal:
    """Who is calling: the digest of their API key (what their jobs are owned by), and
    whether it is an admin key (which sees every job)."""

    owner: str
    admin: bool = False

    def may_see(self, owner: str | None) -> bool:
        return self.admin or (owner is not None and hmac.compare_digest(owner, self.owner))


def key_owner(key: str) -> str:
    """The owner id of an API key: a digest, so that no key is stored."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


async def read_body(request: Any, limit: int, too_large: Exception) -> bytes:
    """The request body; ``too_large`` is raised beyond ``limit`` bytes, before anything
    is read when Content-Length says so."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_large
    return bytes(body)


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """An ``openapi_extra`` that declares ``model`` as a route's JSON body, for routes that
    read the raw body themselves (authorised and size-capped before it is parsed), which
    FastAPI cannot infer; the schema is inlined (``$defs`` resolved) to stand alone."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, list):
            return [inline(v) for v in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return inline({**defs[ref.removeprefix("#/$defs/")], **rest})
        return {k: inline(v) for k, v in node.items()}

    content = {"application/json": {"schema": inline(schema)}}
    return {"requestBody": {"required": True, "content": content}}


# --- errors -------------------------------------------------------------------------------


def error_envelope(exc: AiroborosError) -> dict[str, Any]:
    """``exc`` as OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}``
    (plus the fields the error adds, such as a config's ``problems``): the body of an
    error answer, or of the error event that ends a stream."""
    return error_body(exc.public_message(), exc.kind, exc.code, exc.param, **exc.public_details())


def error_response(exc: AiroborosError) -> JSONResponse:
    """The one HTTP answer to an error of the tree: its status, the envelope,
    ``x-should-retry`` (true only where a retry can help: the OpenAI SDK otherwise retries
    every 408, 409, 429 and 5xx by itself), and Retry-After on every 503."""
    from starlette.responses import JSONResponse

    headers = {"x-should-retry": "true" if exc.should_retry() else "false"}
    if exc.http_status == 503:
        headers["retry-after"] = str(RETRY_AFTER)
    headers.update(exc.http_headers())
    return JSONResponse(error_envelope(exc), status_code=exc.http_status, headers=headers)


def route_error(status: int, detail: Any, codes: dict[int, str] | None = None) -> ApiError:
    """The web framework's own errors (no such route, wrong method, ...) as the tree's."""
    code = {**ROUTE_CODES, **(codes or {})}.get(status, "error")
    return ApiError(str(detail), status=status, code=code)


def unexpected_error(
    exc: BaseException, message: str, *, where: str = "", internal: type[ApiError] = InternalError
) -> ApiError:
    """An exception outside the tree: a 503 (Retry-After) when it says a dependency is down
    (``is_unavailable``: the database, the broker, the object store), else a 500 with
    ``message`` (``internal``'s code); logged either way, the traceback only for the 500."""
    if is_unavailable(exc):
        log.warning("%s: a dependency is down: %r", where or "request", exc)
        return ServiceUnavailable(
            "a dependency of the service is down; try again shortly", code="unavailable"
        )
    log.error("%s failed", where or "request", exc_info=exc)
    return internal(message)


def install_error_handlers(
    app: Any,
    *,
    name: str,
    internal_message: Callable[[Exception], str],
    internal: type[ApiError] = InternalError,
) -> None:
    """Answer every error of a FastAPI ``app`` in the one envelope: the tree's errors by
    their class, the framework's own 404/405 (``route_error``), and anything else as an
    outage (503) or an internal error (``internal``, with ``internal_message(exc)``),
    logged with the service ``name``, the method and the path."""
    from sqlalchemy.exc import SQLAlchemyError
    from starlette.exceptions import HTTPException
    from starlette.requests import Request

    @app.exception_handler(AiroborosError)  # type: ignore[untyped-decorator]
    async def known_error(_: Request, exc: AiroborosError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(HTTPException)  # type: ignore[untyped-decorator]
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return error_response(route_error(exc.status_code, exc.detail))

    # Driver and socket errors are named besides Exception: Starlette answers those it
    # finds a handler for by class in its exception middleware (a response, the request
    # done), while a bare Exception handler runs in its outermost one, which raises again.
    @app.exception_handler(SQLAlchemyError)  # type: ignore[untyped-decorator]
    @app.exception_handler(OSError)  # type: ignore[untyped-decorator]
    @app.exception_handler(Exception)  # type: ignore[untyped-decorator]
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        where = f"{name}: {request.method} {request.url.path}"
        return error_response(
            unexpected_error(exc, internal_message(exc), where=where, internal=internal)
        )
