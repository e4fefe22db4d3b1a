"""The conversation and model-call types every layer shares: messages, requests, responses,
stream events and model references. No behaviour, no imports from the rest of the package
(other than the domain's own generation options).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

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
    # Counted by us, not by the upstream (it reported none): see openai_wire.estimate_usage.
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.estimated or other.estimated,
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


# --------------------------------------------------------------------------- models


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
