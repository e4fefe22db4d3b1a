"""The agent loop: model turns, tool execution, messages to store, the turn cap."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rom_agent.agent.loop import AgentLoop, AgentResult, ModelTurn, ToolCall
from rom_agent.agent.tools import ToolRegistry, default_registry, register_calculator
from rom_agent.config import load_settings
from rom_agent.domain.messages import (
    ChatRequest,
    ChatResponse,
    Message,
    TextBlock,
    ToolResultBlock,
    ToolSpec,
    ToolUseBlock,
    Usage,
)
from rom_agent.flags import FlagStore
from rom_agent.providers.simulator import SimBehaviour, SimulatorProvider

MODEL = "rom-sim-1"
KB_DATA = Path(__file__).parent / "data" / "kb"


@dataclass(frozen=True)
class Turn:
    """Stands in for the pipeline's result: the loop must hand it back untouched."""

    response: ChatResponse
    attempts: int = 1


class Recorder:
    """A ModelTurn over a SimulatorProvider that keeps what each turn was offered."""

    def __init__(self, sim: SimulatorProvider | None = None) -> None:
        self.sim = sim or SimulatorProvider()
        self.offered: list[tuple[str, ...]] = []
        self.sent: list[tuple[Message, ...]] = []
        self.turns: list[Turn] = []

    async def __call__(self, messages: Sequence[Message], tools: Sequence[ToolSpec]) -> Turn:
        self.offered.append(tuple(spec.name for spec in tools))
        self.sent.append(tuple(messages))
        response = await self.sim.complete(ChatRequest(MODEL, messages, tools=tools))
        self.turns.append(Turn(response))
        return self.turns[-1]


def flags(**overrides: Any) -> FlagStore:
    return FlagStore(load_settings(**overrides))


def calculator() -> ToolRegistry:
    registry = ToolRegistry()
    register_calculator(registry)
    return registry


async def run(
    registry: ToolRegistry, text: str, model: ModelTurn[Turn], store: FlagStore | None = None
) -> AgentResult[Turn]:
    loop = AgentLoop(registry, store or flags())
    return await loop.run([Message.text("user", text)], model)


async def test_a_plain_answer_is_one_turn() -> None:
    model = Recorder()
    history = [
        Message.text("user", "olá"),
        Message.text("assistant", "oi"),
        Message.text("user", "tudo bem?"),
    ]

    result = await AgentLoop(calculator(), flags()).run(history, model)

    assert result.turns == 1
    assert result.stop_reason == "answered"
    assert result.tools_used == ()
    assert result.new_messages == (Message("assistant", (TextBlock(result.text),)),)
    assert "tudo bem?" in result.text
    assert result.last_turn is model.turns[0]
    assert result.usage == model.turns[0].response.usage
    assert result.guardrail is None
    assert model.offered == [("calcular",)]


async def test_tool_turns_are_returned_for_the_history() -> None:
    model = Recorder()
    result = await run(calculator(), "SIM_TOOLS:calcular*2", model)

    request, reply, answer = result.new_messages
    uses = [b for b in request.content if isinstance(b, ToolUseBlock)]
    results = [b for b in reply.content if isinstance(b, ToolResultBlock)]
    assert request.role == "assistant" and reply.role == "user" and answer.role == "assistant"
    assert [r.tool_use_id for r in results] == [u.id for u in uses]
    assert [json.loads(r.content)["resultado"] for r in results] == [2, 4]
    assert answer.plain_text == result.text
    assert result.tools_used == (
        ToolCall("calcular", {"expressao": "1 + 1"}, ok=True),
        ToolCall("calcular", {"expressao": "2 + 2"}, ok=True),
    )
    assert result.tools_used[0].to_dict() == {
        "name": "calcular",
        "input": {"expressao": "1 + 1"},
        "ok": True,
    }
    assert result.turns == 2
    assert result.last_turn is model.turns[-1]
    assert result.usage == sum((t.response.usage for t in model.turns), Usage())
    assert result.usage.input_tokens > model.turns[0].response.usage.input_tokens


async def test_the_callers_history_is_not_modified() -> None:
    history = [Message.text("user", "SIM_TOOLS:calcular*3")]
    await AgentLoop(calculator(), flags()).run(history, Recorder())
    assert history == [Message.text("user", "SIM_TOOLS:calcular*3")]


async def test_parallel_tool_calls_run_concurrently() -> None:
    registry = ToolRegistry()
    started = 0
    all_started = asyncio.Event()

    async def rendezvous(args: dict[str, Any]) -> str:
        # Each call waits for the others: run one after another, they would all time out.
        nonlocal started
        started += 1
        if started == 3:
            all_started.set()
        await all_started.wait()
        return "juntos"

    registry.register("encontro", "x", {"type": "object"}, rendezvous, timeout_s=5)
    result = await run(registry, "SIM_TOOLS:encontro*3", Recorder())

    assert [call.ok for call in result.tools_used] == [True, True, True]


async def test_a_tool_timeout_goes_back_to_the_model_and_the_run_goes_on() -> None:
    registry = calculator()
    never = asyncio.Event()

    async def hangs(args: dict[str, Any]) -> str:
        await never.wait()
        return "unreachable"

    registry.register("lenta", "x", {"type": "object"}, hangs, timeout_s=0.01)
    result = await run(registry, "SIM_TOOLS:lenta*2", Recorder())

    assert [call.ok for call in result.tools_used] == [False, False]
    reply = result.new_messages[1]
    assert all(isinstance(b, ToolResultBlock) and b.is_error for b in reply.content)
    assert "tempo limite" in reply.content[0].content  # type: ignore[union-attr]
    assert "recebi 2 resultado(s) de ferramenta, 2 com erro" in result.text


async def test_a_failing_tool_never_fails_the_request() -> None:
    registry = calculator()

    async def fails(args: dict[str, Any]) -> str:
        raise ConnectionError("upstream down")

    registry.register("falha", "Sempre falha.", {"type": "object"}, fails)
    result = await run(registry, "SIM_TOOLS:falha*3", Recorder())

    assert result.stop_reason == "answered"
    assert [call.ok for call in result.tools_used] == [False, False, False]
    assert "3 com erro" in result.text


async def test_an_unknown_tool_requested_by_the_model_is_an_error_result() -> None:
    sim = SimulatorProvider()
    sim.script(MODEL, [SimBehaviour(tool_uses=(ToolUseBlock("t1", "inventada", {}),))])

    result = await run(calculator(), "olá", Recorder(sim))

    assert result.tools_used == (ToolCall("inventada", {}, ok=False),)
    reply = result.new_messages[1].content[0]
    assert isinstance(reply, ToolResultBlock) and "desconhecida" in reply.content


async def test_custom_tool_registration_end_to_end(tmp_path: Path) -> None:
    registry = default_registry(KB_DATA)

    @registry.tool(
        input_schema={
            "type": "object",
            "properties": {"n": {"type": "integer"}},
            "required": ["n"],
        }
    )
    async def consultar_processo(args: dict[str, Any]) -> dict[str, Any]:
        """Consulta um processo pelo número."""
        return {"processo": args["n"], "situacao": "em andamento"}

    model = Recorder()
    result = await run(registry, "SIM_TOOLS:consultar_processo*2", model)

    assert model.offered[0] == ("consultar_kb", "data_hora_atual", "calcular", "consultar_processo")
    assert [c.to_dict() for c in result.tools_used] == [
        {"name": "consultar_processo", "input": {"n": 1}, "ok": True},
        {"name": "consultar_processo", "input": {"n": 2}, "ok": True},
    ]


async def test_kb_tool_through_the_loop() -> None:
    result = await run(default_registry(KB_DATA), "SIM_TOOLS:consultar_kb*1", Recorder())

    reply = result.new_messages[1].content[0]
    assert isinstance(reply, ToolResultBlock) and not reply.is_error
    assert json.loads(reply.content)["resultados"][0]["fonte"] == "prazos-processuais.md"


# --------------------------------------------------------------------------- turn cap


async def test_max_agent_turns_asks_for_a_final_answer_without_tools() -> None:
    model = Recorder()
    result = await run(calculator(), "SIM_TOOLS:calcular*30", model, flags(max_agent_turns=3))

    assert result.turns == 3
    assert result.stop_reason == "max_turns"
    assert model.offered == [("calcular",), ("calcular",), ()]
    assert len(result.tools_used) == 10
    note = model.sent[-1][-1].content[-1]
    assert isinstance(note, TextBlock) and "limite de etapas" in note.text
    assert_stored_turn_is_whole(result)
    assert result.text.startswith("SIM_TOOLS:calcular*30: pedi 10 chamada(s)")
    assert result.guardrail is None  # a loop bound, not a guardrail: present in every mode


async def test_one_turn_means_no_tools_are_offered() -> None:
    model = Recorder()
    result = await run(calculator(), "SIM_TOOLS:calcular*3", model, flags(max_agent_turns=1))

    assert model.offered == [()]
    assert result.turns == 1
    assert result.stop_reason == "answered"


async def test_the_turn_cap_is_read_per_run() -> None:
    store = flags(max_agent_turns=2)
    first = await run(calculator(), "SIM_TOOLS:calcular*30", Recorder(), store)
    store.set({"max_agent_turns": 4})
    second = await run(calculator(), "SIM_TOOLS:calcular*30", Recorder(), store)

    assert (first.turns, second.turns) == (2, 4)


async def test_tool_requests_after_withdrawal_are_dropped() -> None:
    # A misbehaving model keeps asking for tools even when none are offered.
    call = ToolUseBlock("t", "calcular", {"expressao": "1 + 1"})
    sim = SimulatorProvider(default=SimBehaviour(tool_uses=(call,)))

    result = await run(calculator(), "olá", Recorder(sim), flags(max_agent_turns=2))

    answer = result.new_messages[-1]
    assert result.stop_reason == "max_turns"
    assert len(result.tools_used) == 1
    assert answer.role == "assistant"
    assert all(isinstance(b, TextBlock) for b in answer.content)
    assert result.text  # never an empty answer


@pytest.mark.parametrize("mode", ["soft", "full"])
async def test_a_guardrail_stop_offers_no_tools_on_the_final_turn(mode: str) -> None:
    model = Recorder()
    store = flags(
        enable_guardrails=True,
        guardrail_mode=mode,
        guardrail_soft_limit=3,
        guardrail_hard_limit=5,
    )
    result = await run(calculator(), "SIM_TOOLS:calcular*12", model, store)

    assert model.offered == [("calcular",), ()]
    assert result.stop_reason == "hard_limit"
    note = model.sent[-1][-1].content[-1]
    assert isinstance(note, TextBlock) and "Não chame mais ferramentas" in note.text
    assert_stored_turn_is_whole(result)


def assert_stored_turn_is_whole(result: AgentResult[Turn]) -> None:
    """What is stored: tool uses each followed by their results only, then the answer. The
    note asking for a final answer was for that run's model, not part of the conversation."""
    stored = result.new_messages
    assert [m.role for m in stored] == ["assistant", "user"] * (len(stored) // 2) + ["assistant"]
    for request, reply in zip(stored[:-1:2], stored[1::2], strict=True):
        uses = [b.id for b in request.content if isinstance(b, ToolUseBlock)]
        assert [b.tool_use_id for b in reply.content] == uses
        assert all(isinstance(b, ToolResultBlock) for b in reply.content)
