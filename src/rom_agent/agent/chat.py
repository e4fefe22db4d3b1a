"""One chat turn end to end: history in, model turns through the pipeline, the turn stored.

The HTTP layer validates input and maps errors; this module knows no HTTP. A turn is stored
(user message, tool turns and answer, in one transaction) before `chat()` returns, so a 200
always means it is durable.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rom_agent.flags import FlagStore
from rom_agent.providers.base import ChatResponse, Message, ModelRef, ToolSpec, Usage
from rom_agent.store.conversations import ConversationStore


@dataclass(frozen=True, slots=True)
class TurnResult:
    """What one model turn produced and how (fed back by the pipeline)."""

    response: ChatResponse
    model: ModelRef
    fallback_used: bool = False
    attempts: int = 1


ModelTurn = Callable[[Sequence[Message], Sequence[ToolSpec]], Awaitable[TurnResult]]


@dataclass(frozen=True, slots=True)
class ChatTurn:
    text: str
    conversation_id: str
    chain: tuple[ModelRef, ...]
    deadline: float
    fault: Any = None  # resilience.faults.FaultPlan, opaque here


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
            "usage": {
                "inputTokens": self.usage.input_tokens,
                "outputTokens": self.usage.output_tokens,
                "totalTokens": self.usage.total_tokens,
            },
            "latencyMs": self.latency_ms,
            "toolsUsed": self.tools_used,
        }
        if self.guardrail is not None:
            body["guardrail"] = self.guardrail
        return body


TurnFactory = Callable[[ChatTurn], ModelTurn]


class ChatService:
    def __init__(
        self,
        *,
        flags: FlagStore,
        conversations: ConversationStore,
        turn_factory: TurnFactory,
    ) -> None:
        self._flags = flags
        self._conversations = conversations
        self._turn_factory = turn_factory

    async def chat(self, turn: ChatTurn) -> ChatOutcome:
        started = time.perf_counter()
        settings = self._flags.current
        history = await self._conversations.history(
            turn.conversation_id, settings.history_max_messages
        )
        user = Message.text("user", turn.text)
        call_model = self._turn_factory(turn)
        result = await call_model([*history, user], ())
        answer = Message("assistant", result.response.content)
        await self._conversations.append(
            turn.conversation_id, [user, answer], model=result.model.id
        )
        return ChatOutcome(
            response=result.response.text,
            conversation_id=turn.conversation_id,
            model_used=result.model.id,
            fallback_used=result.fallback_used,
            attempts=result.attempts,
            usage=result.response.usage,
            latency_ms=round((time.perf_counter() - started) * 1000),
        )
