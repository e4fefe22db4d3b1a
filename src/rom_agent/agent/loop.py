"""The agent loop (SPEC §6): ask the model, run the tools it asks for, ask again — until it
answers, a guardrail stops tool use, or the run reaches MAX_AGENT_TURNS.

The loop never calls a provider itself: each model turn goes through `call_model`, which the
caller wires to the resilience pipeline (fallback, retries, breakers, deadline). The loop only
needs the turn's `.response` and hands the last turn back so the caller can read the rest
(model used, attempts).

Ending tool use — by a guardrail or by the turn cap — is never an error: the model gets one
more turn with no tools offered and a short note asking for its final answer, and the run
returns normally with the reason. The note is sent, never stored: the stored turn is the user's
message, each tool use with its results, and the answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar

from rom_agent.agent.guardrails import GuardrailReport, RunGuard
from rom_agent.agent.tools import ToolRegistry
from rom_agent.domain.events import Events
from rom_agent.domain.messages import (
    ChatResponse,
    Message,
    TextBlock,
    ToolResultBlock,
    ToolSpec,
    ToolUseBlock,
    Usage,
)
from rom_agent.flags import FlagStore
from rom_agent.logs import get_logger
from rom_agent.resilience.clock import Clock, SystemClock

StopReason = Literal["answered", "hard_limit", "repetition", "max_turns"]

# Model-facing text, in the service's language.
_NUDGE = {
    "hard_limit": "O limite de chamadas de ferramentas desta resposta foi atingido.",
    "repetition": "A mesma ferramenta foi chamada repetidamente com os mesmos parâmetros.",
    "max_turns": "O limite de etapas desta resposta foi atingido.",
}
_NUDGE_TAIL = (
    " Não chame mais ferramentas: responda agora ao pedido do usuário com as informações já "
    "obtidas e diga o que ficou pendente, se for o caso."
)
_NOT_RUN = "Não executada: o limite de uso de ferramentas desta resposta foi atingido."
# Stored when a final turn carries no text, so the history keeps a valid assistant message.
_EMPTY_ANSWER = "Não foi possível concluir a resposta."

_log = get_logger(__name__)


class TurnResult(Protocol):
    """What `call_model` returns: at least the model's response (the pipeline adds more)."""

    @property
    def response(self) -> ChatResponse: ...


T = TypeVar("T", bound=TurnResult)

ModelTurn = Callable[[Sequence[Message], Sequence[ToolSpec]], Awaitable[T]]
"""One model turn: the messages so far and the tools on offer (empty = answer now)."""


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One executed tool call, as listed in the response's `toolsUsed`."""

    name: str
    input: dict[str, Any]
    ok: bool

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "input": self.input, "ok": self.ok}


@dataclass(frozen=True, slots=True)
class AgentResult(Generic[T]):
    text: str  # the final answer
    new_messages: tuple[Message, ...]  # everything appended during the run, to store
    tools_used: tuple[ToolCall, ...]  # executed calls, in the order the model asked
    usage: Usage  # summed over every model turn
    last_turn: T  # the final turn's result (model, attempts, ... from the pipeline)
    turns: int  # model turns made
    stop_reason: StopReason  # "answered" unless tool use was ended for the model
    guardrail: GuardrailReport | None  # None when the effective mode is `off`


class AgentLoop:
    def __init__(
        self,
        tools: ToolRegistry,
        flags: FlagStore,
        events: Events | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._tools = tools
        self._flags = flags
        self._events = events
        self._clock = clock or SystemClock()

    async def run(self, history: Sequence[Message], call_model: ModelTurn[T]) -> AgentResult[T]:
        """Answer the user's message that ends `history`, using tools as the model asks."""
        # One settings snapshot per run: a flag change applies from the next run on.
        settings = self._flags.current
        guard = RunGuard.start(settings, self._events)
        max_turns = settings.max_agent_turns
        specs = self._tools.specs()

        transcript = list(history)
        appended: list[Message] = []
        used: list[ToolCall] = []
        usage = Usage()
        stop: StopReason | None = None  # set once tool use has been ended
        turns = 0

        while True:
            offered: Sequence[ToolSpec] = () if stop or turns + 1 >= max_turns else specs
            turn = await call_model(tuple(transcript), offered)
            turns += 1
            usage += turn.response.usage
            calls = turn.response.tool_uses

            if not calls or not offered:
                answer = _final_message(turn.response, tools_withdrawn=not offered)
                result = AgentResult(
                    text=answer.plain_text,
                    new_messages=(*appended, answer),
                    tools_used=tuple(used),
                    usage=usage,
                    last_turn=turn,
                    turns=turns,
                    stop_reason=stop or "answered",
                    guardrail=guard.report(),
                )
                _log_finished(result)
                return result

            request = Message("assistant", turn.response.content)
            admitted = guard.admit(calls)
            results = await self._execute(calls[:admitted])
            used.extend(
                ToolCall(call.name, call.input, not result.is_error)
                for call, result in zip(calls[:admitted], results, strict=True)
            )
            # Every requested call gets a result, or the next request would be invalid.
            skipped = [
                ToolResultBlock(call.id, _NOT_RUN, is_error=True) for call in calls[admitted:]
            ]
            stop = guard.stop_reason or ("max_turns" if turns + 1 >= max_turns else None)
            reply = Message("user", (*results, *skipped))
            appended += (request, reply)
            if stop:
                # The note is for this run's model only: stored, it would sit in every later
                # window as if the user had written it, telling the model not to use tools.
                note = TextBlock(_NUDGE[stop] + _NUDGE_TAIL)
                transcript += (request, Message("user", (*reply.content, note)))
            else:
                transcript += (request, reply)

    async def _execute(self, calls: Sequence[ToolUseBlock]) -> list[ToolResultBlock]:
        """Run one turn's calls concurrently; results in the order of the calls."""
        if not calls:
            return []
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(self._run_one(call)) for call in calls]
        return [task.result() for task in tasks]

    async def _run_one(self, call: ToolUseBlock) -> ToolResultBlock:
        started = self._clock.now()
        result = await self._tools.run(call)
        _log.info(
            "tool_call",
            tool=call.name,
            ok=not result.is_error,
            duration_ms=round((self._clock.now() - started) * 1000),
        )
        return result


def _log_finished(result: AgentResult[Any]) -> None:
    # A plain answer is already in the access log; only runs that used tools say more.
    notable = bool(result.tools_used) or result.stop_reason != "answered"
    (_log.info if notable else _log.debug)(
        "agent_run_finished",
        turns=result.turns,
        tool_calls=len(result.tools_used),
        stop_reason=result.stop_reason,
        guardrail=result.guardrail.to_dict() if result.guardrail else None,
    )


def _final_message(response: ChatResponse, *, tools_withdrawn: bool) -> Message:
    """The answer as stored: text only. Tool requests made after tools were withdrawn are
    dropped (unanswered requests would make the stored history invalid)."""
    if tools_withdrawn and response.tool_uses:
        _log.warning("tool_use_after_withdrawal_ignored", calls=len(response.tool_uses))
    texts = tuple(b for b in response.content if isinstance(b, TextBlock) and b.text.strip())
    return Message("assistant", texts or (TextBlock(_EMPTY_ANSWER),))
