"""One chat turn end to end: history in, the agent loop over the resilience pipeline, the turn
stored.

The HTTP layer validates input and maps errors; this module knows no HTTP. A turn is stored
(user message, tool turns and answer, in one transaction) before `chat()` returns, so a 200
always means it is durable. A streamed turn is stored only once it is complete: a cut stream
leaves no trace in the history (a half answer would mislead the next turn).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rom_agent.agent.loop import AgentLoop, AgentResult
from rom_agent.domain.messages import (
    ChatResponse,
    ContentBlock,
    Message,
    ModelRef,
    StopEvent,
    TextBlock,
    TextDelta,
    ToolSpec,
    ToolUseEvent,
    Usage,
    UsageEvent,
)
from rom_agent.flags import FlagStore
from rom_agent.resilience.clock import Clock
from rom_agent.resilience.errors import DeadlineExceededError
from rom_agent.resilience.faults import FaultPlan
from rom_agent.resilience.pipeline import ModelCall, Pipeline, PipelineResult, StreamStart
from rom_agent.store.backend import Conversations

OnText = Callable[[str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ChatTurn:
    text: str
    conversation_id: str
    chain: tuple[ModelRef, ...]
    deadline: float
    fault: FaultPlan | None = None


@dataclass(slots=True)
class ChatOutcome:
    response: str
    conversation_id: str
    model_used: str
    fallback_used: bool
    attempts: int
    usage: Usage
    latency_ms: int
    tools_used: list[dict[str, Any]] = field(default_factory=list)
    guardrail: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "response": self.response,
            "conversationId": self.conversation_id,
            "modelUsed": self.model_used,
            "fallbackUsed": self.fallback_used,
            "attempts": self.attempts,
            "usage": usage_dict(self.usage),
            "latencyMs": self.latency_ms,
            "toolsUsed": self.tools_used,
        }
        if self.guardrail is not None:
            body["guardrail"] = self.guardrail
        return body


def usage_dict(usage: Usage) -> dict[str, int | bool]:
    body: dict[str, int | bool] = {
        "inputTokens": usage.input_tokens,
        "outputTokens": usage.output_tokens,
        "totalTokens": usage.total_tokens,
    }
    if usage.estimated:  # the upstream reported none: counted by us (docs/openai.md)
        body["estimated"] = True
    return body


async def collect_stream(pipeline: Pipeline, call: ModelCall, on_text: OnText) -> PipelineResult:
    """One streamed model turn: text goes to `on_text` as it arrives; the whole turn comes
    back as a `PipelineResult`, so the agent loop treats streamed and plain turns alike."""
    start: StreamStart | None = None
    texts: list[str] = []
    tool_uses: list[ContentBlock] = []
    usage = Usage()
    stop_reason = "end_turn"
    # aclosing: if `on_text` raises (client gone), the upstream call and the breaker permit
    # are released now, not whenever the generator is garbage-collected.
    async with contextlib.aclosing(pipeline.stream(call)) as items:
        async for item in items:
            if isinstance(item, TextDelta):
                texts.append(item.text)
                await on_text(item.text)
            elif isinstance(item, ToolUseEvent):
                tool_uses.append(item.tool_use)
            elif isinstance(item, UsageEvent):
                usage += item.usage  # usage events are increments
            elif isinstance(item, StopEvent):
                stop_reason = item.stop_reason
            elif isinstance(item, StreamStart):
                start = item
    assert start is not None, "a committed stream always starts with StreamStart"
    content: tuple[ContentBlock, ...] = ((TextBlock("".join(texts)),) if texts else ()) + tuple(
        tool_uses
    )
    response = ChatResponse(start.model.id, content, stop_reason, usage)
    return PipelineResult(response, start.model, start.fallback_used, start.attempts, [])


class ChatService:
    def __init__(
        self,
        *,
        flags: FlagStore,
        conversations: Conversations,
        pipeline: Pipeline,
        agent: AgentLoop,
        clock: Clock,
    ) -> None:
        self._clock = clock
        self._flags = flags
        self._conversations = conversations
        self._pipeline = pipeline
        self._agent = agent

    async def chat(self, turn: ChatTurn, on_text: OnText | None = None) -> ChatOutcome:
        """Answer `turn`; with `on_text`, every model turn is streamed through it."""
        started = time.perf_counter()
        history = await self._conversations.history(
            turn.conversation_id, self._flags.current.history_max_messages
        )
        user = Message.text("user", turn.text)
        pipeline = self._pipeline
        attempts = 0  # provider attempts over every model turn of the run

        async def call_model(
            messages: Sequence[Message], tools: Sequence[ToolSpec]
        ) -> PipelineResult:
            call = ModelCall(
                messages=messages,
                chain=turn.chain,
                deadline=turn.deadline,
                tools=tools,
                fault=turn.fault,
            )
            nonlocal attempts
            if on_text is None:
                result = await pipeline.complete(call)
            else:
                result = await collect_stream(pipeline, call, on_text)
            attempts += result.attempts
            return result

        # The deadline covers the whole run, tool time included; the pipeline enforces it
        # between and within model calls, this bounds everything else.
        try:
            async with pipeline.timeout_at(turn.deadline):
                result: AgentResult[PipelineResult] = await self._agent.run(
                    [*history, user], call_model
                )
        except TimeoutError:
            raise DeadlineExceededError() from None
        last = result.last_turn
        await self._conversations.append(
            turn.conversation_id, [user, *result.new_messages], model=last.model.id
        )
        return ChatOutcome(
            response=result.text,
            conversation_id=turn.conversation_id,
            model_used=last.model.id,
            fallback_used=last.fallback_used,
            attempts=attempts,
            usage=result.usage,
            latency_ms=round((time.perf_counter() - started) * 1000),
            tools_used=[call.to_dict() for call in result.tools_used],
            guardrail=result.guardrail.to_dict() if result.guardrail else None,
        )
