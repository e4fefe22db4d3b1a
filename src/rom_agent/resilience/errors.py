"""Outcomes of the resilience pipeline that are not an answer.

Every error here carries `status`, `code` and `message`, so the HTTP layer maps them with one
generic handler. None of them is a provider failure: they are never retried and never counted
by a circuit breaker.

`failure_reason()` is the one bounded vocabulary (metric labels, fallback reasons, the
"why" of each model in an error message) derived from a `ProviderError`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from rom_agent.domain.errors import (
    CONTEXT_LENGTH_EXCEEDED,
    ErrorKind,
    ProviderError,
)

# --------------------------------------------------------------------------- reasons

# Bounded label values. Transient: why a model was retried or left; model-specific: why this
# model cannot serve this request; plus our own breaker rejection.
RATE_LIMITED = "rate_limited"
TIMEOUT = "timeout"
ERROR = "error"
CONTEXT_LENGTH = "context_length"
CONTENT_FILTER = "content_filter"
MODEL_ERROR = "model_error"
INVALID_REQUEST = "invalid_request"
CIRCUIT_OPEN = "circuit_open"

# Error types our own layers give the errors they synthesise.
ATTEMPT_TIMEOUT = "AttemptTimeout"
FIRST_TOKEN_TIMEOUT = "FirstTokenTimeout"

_THROTTLING_TYPES = frozenset(
    {"ThrottlingException", "TooManyRequestsException", "RateLimitError", "ModelNotReadyException"}
)
_TIMEOUT_TYPES = frozenset(
    {ATTEMPT_TIMEOUT, FIRST_TOKEN_TIMEOUT, "ModelTimeoutException", "TimeoutError", "timeout"}
)


def failure_reason(error: ProviderError) -> str:
    """Map a classified provider error onto the bounded reason vocabulary."""
    if error.kind is ErrorKind.REQUEST:
        return INVALID_REQUEST
    if error.kind is ErrorKind.POLICY:
        return CONTENT_FILTER
    if error.kind is ErrorKind.MODEL:
        # The providers classified the upstream's codes (and, last, its prose) already.
        return CONTEXT_LENGTH if error.error_type == CONTEXT_LENGTH_EXCEEDED else MODEL_ERROR
    if error.status == 429 or error.error_type in _THROTTLING_TYPES:
        return RATE_LIMITED
    if error.status in (408, 504) or error.error_type in _TIMEOUT_TYPES:
        return TIMEOUT
    return ERROR


# --------------------------------------------------------------------------- outcomes


@dataclass(frozen=True, slots=True)
class AttemptFailure:
    """Why one model of the chain did not answer (its last failure, after its retries)."""

    model: str
    reason: str
    kind: str | None = None  # ErrorKind value; None for our own rejections
    status: int | None = None
    message: str = ""
    attempts: int = 0  # provider calls spent on this model (0 when skipped)

    def describe(self) -> str:
        detail = self.message or self.reason
        if self.status is not None:
            detail = f"{detail}, status {self.status}"
        return f"{self.model} ({self.reason}: {detail})"

    @classmethod
    def from_error(cls, model: str, error: ProviderError, attempts: int) -> AttemptFailure:
        return cls(
            model, failure_reason(error), error.kind.value, error.status, error.message, attempts
        )


class PipelineError(Exception):
    """Base of every non-answer outcome; the HTTP layer reads `status`, `code`, `message`
    (and, in OpenAI's error shape, `openai_code` and `param` where OpenAI has its own)."""

    status: int = 500
    code: str = "INTERNAL"
    openai_code: str | None = None
    param: str | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class CircuitOpenError(PipelineError):
    """Every model of the chain is OPEN: rejected without a single upstream call."""

    status = 503
    code = "CIRCUIT_OPEN"

    def __init__(self, models: Sequence[str], retry_after_s: float) -> None:
        # Whole seconds, at least 1: it becomes a Retry-After header.
        self.retry_after_s = max(1, math.ceil(retry_after_s))
        self.models = tuple(models)
        super().__init__(
            "Service temporarily unavailable: circuit open for every model of the chain "
            f"({', '.join(self.models)}); retry in {self.retry_after_s} s"
        )


class UpstreamFailedError(PipelineError):
    """The chain is exhausted; `tried` says, per model, what went wrong."""

    status = 502
    code = "UPSTREAM_FAILED"

    def __init__(self, tried: Sequence[AttemptFailure]) -> None:
        self.tried = list(tried)
        reasons = "; ".join(failure.describe() for failure in self.tried)
        super().__init__(f"All models of the chain failed: {reasons}")


class DeadlineExceededError(PipelineError):
    """REQUEST_TIMEOUT_S passed; no further attempt is made."""

    status = 504
    code = "TIMEOUT"

    def __init__(self, tried: Sequence[AttemptFailure] = ()) -> None:
        self.tried = list(tried)
        message = "Request deadline (REQUEST_TIMEOUT_S) exceeded"
        if self.tried:
            message += " after: " + "; ".join(failure.describe() for failure in self.tried)
        super().__init__(message)


class RequestRejectedError(PipelineError):
    """The provider said the request itself is invalid, or refused it for content policy:
    returned to the client after that one attempt, no retry, no fallback. The message is
    ours (provider, model, status, kind): the upstream's own text goes to the log only."""

    status = 400
    code = "INVALID_REQUEST"

    def __init__(self, model: str, error: ProviderError) -> None:
        self.model = model
        self.error = error
        if error.kind is ErrorKind.POLICY:
            self.code = "CONTENT_FILTERED"
            self.openai_code = "content_policy_violation"
            super().__init__(f"Request refused by {model} for content policy: {error.message}")
        else:
            super().__init__(f"Request rejected by {model}: {error.message}")


class ContextLengthExceededError(PipelineError):
    """Every model of the chain said the request does not fit its context window: a client
    error (shorten the input), not an outage — so the SDKs do not retry it."""

    status = 400
    code = "CONTEXT_LENGTH_EXCEEDED"
    openai_code = "context_length_exceeded"
    param = "messages"

    def __init__(self, tried: Sequence[AttemptFailure]) -> None:
        self.tried = list(tried)
        reasons = "; ".join(failure.describe() for failure in self.tried)
        super().__init__(
            f"The request exceeds the context window of every model of the chain: {reasons}"
        )


class StreamInterruptedError(PipelineError):
    """A committed stream (the first chunk was delivered) did not end cleanly.

    Never retried or rerouted: the client already has part of the answer.
    """

    status = 502

    def __init__(self, message: str, code: str = "STREAM_INTERRUPTED", status: int = 502) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
