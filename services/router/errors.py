"""The router's errors, in OpenAI's envelope: ``{"error": {"message", "type", "param",
"code"}}`` with an HTTP status. They belong to the project's one tree
(``airoboros.errors.AiroborosError``); the HTTP edge only serialises them."""

from __future__ import annotations

import json
from typing import Any

from airoboros.errors import AiroborosError


class RouterError(AiroborosError):
    """A request the router answers with an error: ``status`` and the envelope's fields."""

    code = "invalid_request"
    status = 400
    type = "invalid_request_error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        elif self.status >= 500:
            self.type = "server_error"
        if code is not None:
            self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def envelope(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)


class ModelNotFound(RouterError):
    code = "model_not_found"
    status = 404


class Unauthorized(RouterError):
    code = "invalid_api_key"
    status = 401


class TooLarge(RouterError):
    code = "request_too_large"
    status = 413


class RateLimited(RouterError):
    code = "rate_limit_exceeded"
    status = 429
    type = "requests"


class Unavailable(RouterError):
    """No backend could take the request, or the routing index is not loaded yet."""

    code = "service_unavailable"
    status = 503
    type = "server_error"


class BadGateway(RouterError):
    """A backend failed (5xx, or the connection broke after the request was sent)."""

    code = "backend_error"
    status = 502
    type = "server_error"


def error_body(
    message: str,
    type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def normalise_error(status: int, content: bytes) -> dict[str, Any]:
    """A backend's error body in OpenAI's envelope, whatever its shape: OpenAI's and
    vLLM's (``{"error": {...}}``, code may be an int), TGI's and LoRAX's
    (``{"error": "...", "error_type": "..."}``), FastAPI's (``{"detail": ...}``), text."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    try:
        data: Any = json.loads(content)
    except ValueError:
        text = content.decode("utf-8", errors="replace").strip()
        return error_body(text[:1000] or f"backend answered HTTP {status}", kind)
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict):
            return error_body(
                str(err.get("message") or f"backend answered HTTP {status}"),
                str(err.get("type") or kind),
                None if err.get("code") is None else str(err.get("code")),
                None if err.get("param") is None else str(err.get("param")),
            )
        if isinstance(err, str):
            return error_body(err, str(data.get("error_type") or kind))
        if "detail" in data:
            detail = data["detail"]
            message = detail if isinstance(detail, str) else json.dumps(detail)[:1000]
            return error_body(message, kind)
        if isinstance(data.get("message"), str):
            return error_body(data["message"], kind)
    return error_body(json.dumps(data)[:1000], kind)
