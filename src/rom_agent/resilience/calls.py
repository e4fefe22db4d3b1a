"""What the pipeline is asked for and what it answers: one model turn in, a result (or a
committed stream's first item) out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rom_agent.domain.messages import ChatResponse, Message, ModelRef, StreamEvent, ToolSpec
from rom_agent.domain.options import NO_OPTIONS, GenerationOptions
from rom_agent.resilience.errors import AttemptFailure
from rom_agent.resilience.faults import FaultPlan


@dataclass(frozen=True, slots=True)
class ModelCall:
    """One model turn, as the agent loop asks for it."""

    messages: Sequence[Message]
    chain: Sequence[ModelRef]
    deadline: float  # absolute, on the pipeline's clock (see Pipeline.new_deadline)
    system: str | None = None
    tools: Sequence[ToolSpec] = ()
    fault: FaultPlan | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    options: GenerationOptions = NO_OPTIONS
    hints: dict[str, Any] = field(default_factory=dict)  # passed to ChatRequest.hints as is


@dataclass(frozen=True, slots=True)
class PipelineResult:
    response: ChatResponse
    model: ModelRef  # the model that answered
    fallback_used: bool  # it is not the chain's first
    attempts: int  # provider calls made, retries included
    tried: list[AttemptFailure]  # why each earlier model did not answer


@dataclass(frozen=True, slots=True)
class StreamStart:
    """First item of a committed stream, right before its first content event."""

    model: ModelRef
    fallback_used: bool
    attempts: int


StreamItem = StreamStart | StreamEvent
