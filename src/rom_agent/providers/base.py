"""The provider interface and the one error taxonomy every provider maps its failures onto.

Providers know no policy: they make exactly one upstream request per call, never retry, and
report failures as `ProviderError` with a `kind` the resilience layers decide on.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from rom_agent.domain.options import NO_OPTIONS, GenerationOptions

# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class TextBlock:
    text: str


@dataclass(frozen=True, slots=True)
class ToolUseBlock:
    id: str
    name: str
    input: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ToolResultBlock:
    tool_use_id: str
    content: str
    is_error: bool = False


ContentBlock = TextBlock | ToolUseBlock | ToolResultBlock
Role = Literal["user", "assistant"]


@dataclass(frozen=True, slots=True)
class Message:
    """One conversation message. Tool results travel in `user` messages, as in Bedrock."""

    role: Role
    content: tuple[ContentBlock, ...]

    @classmethod
    def text(cls, role: Role, text: str) -> Message:
        return cls(role, (TextBlock(text),))

    @property
    def plain_text(self) -> str:
        return "".join(block.text for block in self.content if isinstance(block, TextBlock))


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str
    description: str
    input_schema: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens, self.output_tokens + other.output_tokens
        )


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """One model call. `model` is the provider's own model id (no provider prefix)."""

    model: str
    messages: Sequence[Message]
    system: str | None = None
    tools: Sequence[ToolSpec] = ()
    max_tokens: int | None = None
    temperature: float | None = None
    options: GenerationOptions = NO_OPTIONS
    # Seconds this attempt may take; providers size their HTTP timeouts from it.
    timeout_s: float | None = None
    # Opaque per-request directives for the simulator and fault drills (never sent upstream).
    hints: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ChatResponse:
    model: str
    content: tuple[ContentBlock, ...]
    stop_reason: str
    usage: Usage

    @property
    def text(self) -> str:
        return "".join(block.text for block in self.content if isinstance(block, TextBlock))

    @property
    def tool_uses(self) -> tuple[ToolUseBlock, ...]:
        return tuple(block for block in self.content if isinstance(block, ToolUseBlock))


# --------------------------------------------------------------------------- stream events


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolUseEvent:
    tool_use: ToolUseBlock


@dataclass(frozen=True, slots=True)
class UsageEvent:
    usage: Usage


@dataclass(frozen=True, slots=True)
class StopEvent:
    """The upstream's terminator. A stream that ends without one was cut."""

    stop_reason: str


StreamEvent = TextDelta | ToolUseEvent | UsageEvent | StopEvent


# --------------------------------------------------------------------------- errors


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


# --------------------------------------------------------------------------- interface


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


@dataclass(frozen=True, slots=True)
class ModelRef:
    """`provider/model` from MODEL_CHAIN. `id` (no prefix) is what labels and routes use."""

    provider: str
    id: str

    @classmethod
    def parse(cls, qualified: str) -> ModelRef:
        provider, _, model = qualified.partition("/")
        return cls(provider, model)

    @property
    def qualified(self) -> str:
        return f"{self.provider}/{self.id}"
