"""One exception tree for the whole system.

Edges (the CLI, HTTP routes, queue handlers) translate these into one error shape;
nothing below the edges formats user-facing errors itself. Each class says how an HTTP
API answers it (``http_status``, OpenAI's error ``type``, ``code``, ``param``); the one
envelope builder is ``airoboros.web.error_response`` (the body: ``airoboros.protocol``).
"""

from __future__ import annotations

from typing import Any

#: statuses a client may retry (the OpenAI SDK's own list): ``x-should-retry`` is true
RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


class AiroborosError(Exception):
    """Base of every error this project raises on purpose."""

    #: short machine-readable code, used in HTTP error bodies and job events
    code = "error"
    #: the status an HTTP API answers with: an error raised on purpose is, unless a class
    #: says otherwise, about what the caller sent
    http_status = 400
    #: OpenAI's error ``type``; None: ``invalid_request_error`` below 500, else
    #: ``server_error``
    error_type: str | None = None
    #: the request field at fault, when there is one
    param: str | None = None

    @property
    def kind(self) -> str:
        """The envelope's ``type``."""
        if self.error_type is not None:
            return self.error_type
        return "invalid_request_error" if self.http_status < 500 else "server_error"

    def public_message(self) -> str:
        """What an HTTP answer says (a class may say less than ``str()`` does)."""
        return str(self)

    def public_details(self) -> dict[str, Any]:
        """Fields the envelope carries beside message, type, param and code."""
        return {}

    def http_headers(self) -> dict[str, str]:
        """Headers of the answer (Retry-After, ...)."""
        return {}

    def should_retry(self) -> bool:
        """The ``x-should-retry`` header: whether retrying the same request can help."""
        return self.http_status in RETRYABLE_STATUSES


class ConfigError(AiroborosError):
    """The configuration is invalid. ``problems`` lists every problem, each naming its key."""

    code = "invalid_config"
    http_status = 422

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))

    def public_details(self) -> dict[str, Any]:
        return {"problems": self.problems}

    def __str__(self) -> str:
        # One line, whatever the number of problems: it is what the CLI prints.
        if len(self.problems) == 1:
            return f"invalid config: {self.problems[0]}"
        return f"invalid config ({len(self.problems)} problems): " + "; ".join(self.problems)


class MissingCredentials(AiroborosError):
    """Neither an API key nor a base URL for the LLM endpoint was given."""

    code = "missing_credentials"

    def __init__(self) -> None:
        super().__init__(
            "no LLM endpoint configured: set OPENAI_API_KEY to use OpenAI, or OPENAI_BASE_URL "
            "(e.g. http://localhost:8000/v1) for a local OpenAI-compatible server"
        )


class DependencyUnavailable(AiroborosError):
    """A system the service depends on (the database, the broker, the object store) is
    down or unreachable for now: trying again later can succeed. HTTP answers 503 with
    Retry-After; a queue handler keeps its message and tries again."""

    code = "unavailable"
    http_status = 503

    def public_message(self) -> str:
        return f"{self}; try again shortly"


class BusError(AiroborosError):
    """The message bus failed in a way the caller should know about."""

    code = "bus_error"


class BusUnavailable(BusError, DependencyUnavailable):
    """The broker could not be reached (or did not confirm) within the time allowed."""

    code = "bus_unavailable"


class NotFoundError(AiroborosError):
    code = "not_found"
    http_status = 404


class StoreError(AiroborosError):
    code = "store_error"


class StoreUnavailable(StoreError, DependencyUnavailable):
    """The database cannot be reached."""

    code = "store_unavailable"


class ObjectStoreUnavailable(StoreError, DependencyUnavailable):
    """The object store (S3, MinIO) cannot be reached."""

    code = "object_store_unavailable"


#: Exception classes of the drivers that mean "the server is not there (now)", by name,
#: so that this module imports no driver.
_DRIVER_OUTAGES = frozenset(
    {
        # asyncpg
        "CannotConnectNowError",
        "ConnectionDoesNotExistError",
        "ConnectionFailureError",
        "AdminShutdownError",
        "CrashShutdownError",
        "TooManyConnectionsError",
        # aio-pika / aiormq
        "AMQPConnectionError",
        "ConnectionClosed",
        "ChannelInvalidStateError",
        # redis
        "ConnectionError",
        "TimeoutError",
        "BusyLoadingError",
        # minio / urllib3
        "MaxRetryError",
        "NewConnectionError",
        "ProtocolError",
    }
)


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says a dependency is down for now, rather than
    that the request was wrong: connection refused or reset, timeouts, a database that
    is shutting down or starting, a broken pool connection."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DependencyUnavailable):
            return True
        if isinstance(e, ConnectionError | TimeoutError):
            return True
        if type(e).__name__ in _DRIVER_OUTAGES:
            return True
        if _sqlalchemy_outage(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _sqlalchemy_outage(e: BaseException) -> bool:
    try:
        from sqlalchemy import exc as sa
    except ImportError:  # pragma: no cover - sqlalchemy is a core dependency
        return False
    if isinstance(e, sa.DBAPIError) and e.connection_invalidated:
        return True
    if isinstance(e, sa.TimeoutError):  # no connection free in the pool in time
        return True
    # A driver's connection errors are found as the cause (ConnectionRefusedError, the
    # asyncpg classes above); of SQLite's operational errors, only a busy database is one
    # (not "no such table", which no retry fixes).
    return isinstance(e, sa.OperationalError) and "database is locked" in str(e)


# --- LLM errors -------------------------------------------------------------------------


class LLMError(AiroborosError):
    """An LLM call failed. ``retryable`` says whether trying again can help."""

    code = "llm_error"
    retryable = False
    #: to an API's caller the LLM endpoint is an upstream server that failed
    http_status = 502

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        #: the endpoint's HTTP status (not ours)
        self.status = status

    def public_message(self) -> str:
        # What the endpoint said, or which error it was, is not repeated: the answer must
        # not tell a caller anything about an address (open port or not, what answered).
        return f"the LLM endpoint failed ({self.code})"


class RateLimitError(LLMError):
    code = "rate_limited"
    retryable = True

    def __init__(
        self, message: str, *, status: int | None = 429, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class ServerError(LLMError):
    code = "server_error"
    retryable = True


class LLMTimeoutError(LLMError):
    code = "timeout"
    retryable = True


class ConnectError(LLMError):
    """The endpoint could not be reached at all."""

    code = "unreachable"
    retryable = True


class ContextLengthError(LLMError):
    code = "context_length_exceeded"


class BadRequestError(LLMError):
    code = "bad_request"


class ModelNotFoundError(BadRequestError):
    """The endpoint does not serve the model asked for."""

    code = "model_not_found"


class AuthError(LLMError):
    code = "auth_error"


class BudgetExhausted(AiroborosError):
    """The job's token or money budget is spent; no new call may be made."""

    code = "budget_exhausted"


# --- what the HTTP APIs answer (topics, router, inference) --------------------------------


class ApiError(AiroborosError):
    """An answer of an HTTP API in OpenAI's envelope ``{"error": {"message", "type",
    "param", "code"}}``. The class gives the defaults (``http_status``, ``code``,
    ``error_type``); one raise may set each of them, the headers of the answer, extra
    envelope fields and whether the client should retry."""

    code = "invalid_request"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        details: dict[str, Any] | None = None,
        retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.http_status = status
        if type is not None:
            self.error_type = type
        if code is not None:
            self.code = code
        self.param = param
        self.headers = dict(headers or {})
        self.details = dict(details or {})
        self._retry = retry

    def public_details(self) -> dict[str, Any]:
        return self.details

    def http_headers(self) -> dict[str, str]:
        return self.headers

    def should_retry(self) -> bool:
        return super().should_retry() if self._retry is None else self._retry


class InvalidRequest(ApiError):
    """The request cannot be served as sent (a 400 naming the field at fault)."""

    code = "invalid_request"
    http_status = 400


class ContextLengthExceeded(InvalidRequest):
    """The prompt (with the completion asked for) does not fit the model's context."""

    code = "context_length_exceeded"


class Unsupported(InvalidRequest):
    """A request feature this server does not implement (rather than silently ignore)."""

    code = "unsupported"


class AdapterRejected(InvalidRequest):
    """An adapter name, path, URI or its files are not acceptable."""

    code = "invalid_adapter"


class Unauthorized(ApiError):
    """No API key, or not one of the server's."""

    code = "invalid_api_key"
    http_status = 401


class UnknownModel(ApiError):
    """The ``model`` (or expert) a request names is not served here. (Not the LLM client's
    ``ModelNotFoundError``, which is an endpoint refusing our own request.)"""

    code = "model_not_found"
    http_status = 404


class Conflict(AiroborosError):
    """What is asked does not fit the state of what it is asked of (a job that is not
    finished, a name that is taken): asking again will not change that."""

    code = "conflict"
    http_status = 409

    def should_retry(self) -> bool:
        return False  # the OpenAI SDK would retry a 409 by default


class AdapterConflict(Conflict, ApiError):
    """An adapter of that name is registered already (and ``replace`` was not asked)."""

    code = "adapter_exists"


class PayloadTooLarge(ApiError):
    """The request body is larger than the server takes."""

    code = "payload_too_large"
    http_status = 413


class RateLimited(ApiError):
    """The caller's key used its requests per minute; ``retry-after`` says when to retry."""

    code = "rate_limit_exceeded"
    http_status = 429
    error_type = "requests"


class Overloaded(ApiError):
    """The server has too many requests waiting."""

    code = "overloaded"
    http_status = 429


class InternalError(ApiError):
    """A failure no class above foresaw: the service's log has the details."""

    code = "internal_error"
    http_status = 500


class BackendFailure(ApiError):
    """Generation failed inside the generation backend (a crash, the TGI server failing)."""

    code = "backend_error"
    http_status = 500


class BadGateway(ApiError):
    """The server this one forwards to failed (5xx, or the connection broke after the
    request was sent)."""

    code = "backend_error"
    http_status = 502


class ServiceUnavailable(ApiError):
    """The service cannot take the request now (starting, no backend reachable, the
    routing index still loading); answered with Retry-After."""

    code = "service_unavailable"
    http_status = 503


class AdapterUnavailable(ApiError):
    """The adapter could not be loaded from its source (a store or file went away)."""

    code = "adapter_unavailable"
    http_status = 503
