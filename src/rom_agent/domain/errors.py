"""The one error taxonomy every provider maps its failures onto, and the resilience layers
decide on (retry, breaker, fallback) without knowing which provider failed.
"""

from __future__ import annotations

import enum


class ErrorKind(enum.StrEnum):
    TRANSIENT = "transient"  # worth retrying; counted by the breaker; falls back
    MODEL = "model"  # this model cannot serve this request; falls back, not retried
    REQUEST = "request"  # the request itself is invalid; returned to the client as is
    # Refused for content policy: the caller's answer. One attempt, a 4xx, not counted, no
    # fallback unless CONTENT_POLICY_FALLBACK is on.
    POLICY = "policy"


# Canonical `error_type`s the providers give errors they recognise, whatever the upstream's
# own spelling (its code, exception name or prose): the resilience layer reads these only.
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
CONTENT_FILTER = "content_filter"


# Upstream text kept for the log line of the attempt: enough to diagnose, bounded.
DETAIL_MAX_CHARS = 1000


class ProviderError(Exception):
    """A failed upstream call, classified. The resilience layers look at nothing else.

    `message` is ours and may reach clients: it never quotes the upstream. What the upstream
    said (its error body, which can hold URLs, account ids or key fragments) is `detail`,
    bounded, for the operator's log line only.
    """

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        status: int | None = None,
        error_type: str | None = None,
        retry_after_s: float | None = None,
        retryable: bool | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.error_type = error_type
        self.retry_after_s = retry_after_s
        self.detail = detail[:DETAIL_MAX_CHARS] if detail else None
        # Injected drill faults are transient (counted, fall back) but not retried.
        self.retryable = kind is ErrorKind.TRANSIENT if retryable is None else retryable

    def __repr__(self) -> str:
        return (
            f"ProviderError({self.kind.value}, {self.message!r}, status={self.status}, "
            f"error_type={self.error_type!r})"
        )
