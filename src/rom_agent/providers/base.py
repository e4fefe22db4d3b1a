"""The provider interface, and the HTTP-status helpers every HTTP provider shares.

Providers know no policy: they make exactly one upstream request per call, never retry, and
report failures as `ProviderError` (see `rom_agent.domain.errors`) with a `kind` the
resilience layers decide on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

# The shared types moved to `rom_agent.domain`; re-exported so branches written against the
# old import path keep working while they land. New code imports from `rom_agent.domain`.
from rom_agent.domain.errors import (
    CONTENT_FILTER,
    CONTEXT_LENGTH_EXCEEDED,
    DETAIL_MAX_CHARS,
    ErrorKind,
    ProviderError,
)
from rom_agent.domain.messages import (
    ChatRequest,
    ChatResponse,
    ContentBlock,
    Message,
    ModelRef,
    Role,
    StopEvent,
    StreamEvent,
    TextBlock,
    TextDelta,
    ToolResultBlock,
    ToolSpec,
    ToolUseBlock,
    ToolUseEvent,
    Usage,
    UsageEvent,
)
from rom_agent.domain.options import GenerationOptions

__all__ = [
    "CONTENT_FILTER",
    "CONTEXT_LENGTH_EXCEEDED",
    "DETAIL_MAX_CHARS",
    "ChatRequest",
    "ChatResponse",
    "ContentBlock",
    "ErrorKind",
    "Message",
    "ModelRef",
    "Provider",
    "ProviderError",
    "Role",
    "StopEvent",
    "StreamEvent",
    "TextBlock",
    "TextDelta",
    "ToolResultBlock",
    "ToolSpec",
    "ToolUseBlock",
    "ToolUseEvent",
    "Usage",
    "UsageEvent",
    "classify_status",
    "parse_retry_after",
    "unsupported_options",
]


def classify_status(status: int) -> ErrorKind:
    """The HTTP-status part of the taxonomy, shared by every HTTP provider."""
    if status == 429 or status == 408 or status >= 500:
        return ErrorKind.TRANSIENT
    if status in (401, 403, 404):
        return ErrorKind.MODEL
    return ErrorKind.REQUEST


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds form only; dates are ignored)."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


@runtime_checkable
class Provider(Protocol):
    """One upstream API. One call = exactly one upstream request; no retries inside."""

    name: str

    async def complete(self, request: ChatRequest) -> ChatResponse: ...

    def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]: ...

    async def aclose(self) -> None: ...


def unsupported_options(provider: Provider, options: GenerationOptions) -> list[str]:
    """The options of `options` that `provider` cannot honour (wire names). A provider that
    does not say (`unsupported(options)`) is taken to honour none of them."""
    check = getattr(provider, "unsupported", None)
    return options.asked() if check is None else list(check(options))
