"""One exception tree for the whole system.

Edges (the CLI, HTTP routes, queue handlers) translate these into one error shape;
nothing below the edges formats user-facing errors itself.
"""

from __future__ import annotations


class AiroborosError(Exception):
    """Base of every error this project raises on purpose."""

    #: short machine-readable code, used in HTTP error bodies and job events
    code = "error"


class ConfigError(AiroborosError):
    """The configuration is invalid. ``problems`` lists every problem, each naming its key."""

    code = "invalid_config"

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))

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


class BusError(AiroborosError):
    """The message bus failed in a way the caller should know about."""

    code = "bus_error"


class BusUnavailable(BusError, DependencyUnavailable):
    """The broker could not be reached (or did not confirm) within the time allowed."""

    code = "bus_unavailable"


class NotFoundError(AiroborosError):
    code = "not_found"


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

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


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
