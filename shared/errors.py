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


class BusError(AiroborosError):
    """The message bus failed in a way the caller should know about."""

    code = "bus_error"


class BusUnavailable(BusError):
    """The broker could not be reached (or did not confirm) within the time allowed."""

    code = "bus_unavailable"


class NotFoundError(AiroborosError):
    code = "not_found"


class StoreError(AiroborosError):
    code = "store_error"


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
