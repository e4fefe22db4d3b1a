"""The simulator's drill directives (SPEC §7) and the behaviour they must not disturb."""

from __future__ import annotations

import asyncio

from rom_agent.domain.messages import (
    ChatRequest,
    ChatResponse,
    Message,
    StopEvent,
    TextBlock,
    ToolResultBlock,
    ToolSpec,
    ToolUseBlock,
    ToolUseEvent,
)
from rom_agent.providers.simulator import (
    SimBehaviour,
    SimulatorProvider,
    ToolDirective,
    parse_directive,
)

MODEL = "rom-sim-1"
TOOLS = (
    ToolSpec("calcular", "arithmetic", {"type": "object"}),
    ToolSpec("consultar_kb", "search", {"type": "object"}),
    ToolSpec("minha_ferramenta", "custom", {"type": "object"}),
)


async def complete(
    sim: SimulatorProvider, messages: list[Message], tools: tuple[ToolSpec, ...] = TOOLS
) -> ChatResponse:
    return await sim.complete(ChatRequest(MODEL, messages, tools=tools))


def answer_all(messages: list[Message], response: ChatResponse, *, error: bool = False) -> None:
    """Append the model's tool turn and one result per call, as the agent loop does."""
    messages.append(Message("assistant", response.content))
    results = tuple(ToolResultBlock(u.id, "ok", is_error=error) for u in response.tool_uses)
    messages.append(Message("user", results))


async def drive(sim: SimulatorProvider, text: str) -> list[ChatResponse]:
    """Feed results back until the simulator answers with text; return every response."""
    messages = [Message.text("user", text)]
    responses = []
    while True:
        response = await complete(sim, messages)
        responses.append(response)
        if not response.tool_uses:
            return responses
        answer_all(messages, response)


def test_parse_directive() -> None:
    assert parse_directive("faça SIM_TOOLS:consultar_kb*30 agora") == ToolDirective(
        "consultar_kb", 30, repeat=False
    )
    assert parse_directive("SIM_REPEAT:calcular*5") == ToolDirective("calcular", 5, repeat=True)
    assert parse_directive("sim_tools:calcular*5") is None  # directives are case-sensitive
    assert parse_directive("SIM_TOOLS:calcular") is None
    assert parse_directive("olá") is None


async def test_sim_tools_requests_n_calls_five_per_turn_with_distinct_inputs() -> None:
    responses = await drive(SimulatorProvider(), "SIM_TOOLS:consultar_kb*12")

    assert [len(r.tool_uses) for r in responses] == [5, 5, 2, 0]
    assert [r.stop_reason for r in responses] == ["tool_use", "tool_use", "tool_use", "end_turn"]
    uses = [u for r in responses for u in r.tool_uses]
    assert {u.name for u in uses} == {"consultar_kb"}
    assert len({str(u.input) for u in uses}) == 12
    assert len({u.id for u in uses}) == 12
    assert all(isinstance(u.input["query"], str) for u in uses)
    assert "recebi 12 resultado(s)" in responses[-1].text


async def test_sim_tools_inputs_per_tool() -> None:
    calc = (await drive(SimulatorProvider(), "SIM_TOOLS:calcular*2"))[0].tool_uses
    custom = (await drive(SimulatorProvider(), "SIM_TOOLS:minha_ferramenta*2"))[0].tool_uses

    assert [u.input for u in calc] == [{"expressao": "1 + 1"}, {"expressao": "2 + 2"}]
    assert [u.input for u in custom] == [{"n": 1}, {"n": 2}]


async def test_sim_repeat_requests_the_same_input_one_call_per_turn() -> None:
    responses = await drive(SimulatorProvider(), "SIM_REPEAT:calcular*4")

    assert [len(r.tool_uses) for r in responses] == [1, 1, 1, 1, 0]
    inputs = [u.input for r in responses for u in r.tool_uses]
    assert inputs == [inputs[0]] * 4
    assert "pedi 4 chamada(s) de calcular" in responses[-1].text


async def test_no_tools_offered_means_answer_at_once() -> None:
    sim = SimulatorProvider()
    messages = [Message.text("user", "SIM_TOOLS:calcular*10")]
    first = await complete(sim, messages)
    answer_all(messages, first, error=True)

    # The loop withdrew tools: the rest of the directive is abandoned, with a summary.
    final = await complete(sim, messages, tools=())

    assert final.tool_uses == ()
    assert final.stop_reason == "end_turn"
    assert "pedi 5 chamada(s)" in final.text
    assert "recebi 5 resultado(s) de ferramenta, 5 com erro" in final.text
    assert "Encerrei antes do previsto" in final.text


async def test_a_tool_not_offered_is_not_requested() -> None:
    response = await complete(SimulatorProvider(), [Message.text("user", "SIM_TOOLS:outra*3")])

    assert response.tool_uses == ()
    assert "pedi 0 chamada(s) de outra" in response.text


async def test_a_loop_note_next_to_tool_results_does_not_start_a_new_run() -> None:
    sim = SimulatorProvider()
    messages = [Message.text("user", "SIM_TOOLS:calcular*7")]
    first = await complete(sim, messages)
    messages.append(Message("assistant", first.content))
    results = tuple(ToolResultBlock(u.id, "ok") for u in first.tool_uses)
    messages.append(Message("user", (*results, TextBlock("nota do loop"))))

    second = await complete(sim, messages)

    assert len(second.tool_uses) == 2  # 7 - 5 already requested


async def test_directive_of_an_earlier_run_is_ignored() -> None:
    sim = SimulatorProvider()
    history = [
        Message.text("user", "SIM_TOOLS:calcular*1"),
        Message.text("assistant", "feito"),
        Message.text("user", "olá, tudo bem?"),
    ]

    response = await complete(sim, history)

    assert response.tool_uses == ()
    assert "olá, tudo bem?" in response.text


async def test_concurrent_runs_do_not_interfere() -> None:
    sim = SimulatorProvider()

    tools_run, repeat_run = await asyncio.gather(
        drive(sim, "SIM_TOOLS:calcular*7"), drive(sim, "SIM_REPEAT:consultar_kb*3")
    )

    assert [len(r.tool_uses) for r in tools_run] == [5, 2, 0]
    assert [len(r.tool_uses) for r in repeat_run] == [1, 1, 1, 0]


async def test_directives_stream_as_tool_use_events() -> None:
    sim = SimulatorProvider()
    request = ChatRequest(MODEL, [Message.text("user", "SIM_TOOLS:calcular*3")], tools=TOOLS)

    events = [event async for event in sim.stream(request)]

    assert sum(isinstance(e, ToolUseEvent) for e in events) == 3
    assert events[-1] == StopEvent("tool_use")


async def test_scripted_behaviours_take_precedence_and_plain_chat_is_unchanged() -> None:
    scripted = ToolUseBlock("t1", "calcular", {"expressao": "6 * 7"})
    sim = SimulatorProvider()
    sim.script(MODEL, [SimBehaviour(tool_uses=(scripted,))])
    messages = [Message.text("user", "SIM_TOOLS:consultar_kb*3")]

    first = await complete(sim, messages)
    plain = await complete(sim, [Message.text("user", "Hello, how are you?")])

    assert first.tool_uses == (scripted,)
    assert plain.stop_reason == "end_turn"
    assert plain.text.startswith("Hello! This is rom-sim-1")
