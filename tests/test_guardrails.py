"""Guardrail modes (SPEC §6) end to end through the agent loop, driven by simulator drills.

Limits used throughout: soft 3, hard 5, repetition 3 (unless a test says otherwise).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from rom_agent.agent.guardrails import GuardrailReport, Mode, RunGuard
from rom_agent.agent.loop import AgentLoop, AgentResult, ModelTurn
from rom_agent.agent.tools import ToolRegistry, register_calculator
from rom_agent.config import load_settings
from rom_agent.domain.events import Events
from rom_agent.domain.messages import (
    ChatRequest,
    ChatResponse,
    Message,
    ToolResultBlock,
    ToolSpec,
    ToolUseBlock,
)
from rom_agent.flags import FlagStore
from rom_agent.instrumentation.prometheus import PrometheusMetrics as Metrics
from rom_agent.providers.simulator import SimulatorProvider

MODEL = "rom-sim-1"


@dataclass(frozen=True)
class Turn:
    response: ChatResponse


def sim_turn(sim: SimulatorProvider) -> ModelTurn[Turn]:
    async def call_model(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> Turn:
        return Turn(await sim.complete(ChatRequest(MODEL, messages, tools=tools)))

    return call_model


def make_flags(mode: str = "soft", *, enable: bool = True, **limits: int) -> FlagStore:
    params: dict[str, Any] = {
        "guardrail_soft_limit": 3,
        "guardrail_hard_limit": 5,
        "guardrail_repetition_limit": 3,
        **limits,
    }
    return FlagStore(load_settings(enable_guardrails=enable, guardrail_mode=mode, **params))


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(enabled=lambda: True, models=[MODEL])


def triggered(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("guardrails_triggered_total", {"reason": reason})
    return value or 0.0


class Counted:
    """A registry whose tools count their executions, to check what really ran."""

    def __init__(self) -> None:
        self.runs = 0
        self.registry = ToolRegistry()
        register_calculator(self.registry)
        self.registry.register("contar", "conta", {"type": "object"}, self._count)

    async def _count(self, args: dict[str, Any]) -> str:
        self.runs += 1
        return "ok"


async def run(
    flags: FlagStore, text: str, metrics: Metrics | None = None, tools: Counted | None = None
) -> AgentResult[Turn]:
    events = Events(metrics) if metrics is not None else None
    loop = AgentLoop((tools or Counted()).registry, flags, events)
    return await loop.run([Message.text("user", text)], sim_turn(SimulatorProvider()))


def report(result: AgentResult[Turn]) -> dict[str, Any]:
    assert result.guardrail is not None
    return result.guardrail.to_dict()


# --------------------------------------------------------------------------- soft


async def test_soft_below_the_soft_limit_reports_quiet_stats(metrics: Metrics) -> None:
    result = await run(make_flags("soft"), "SIM_TOOLS:calcular*2", metrics)

    assert report(result) == {
        "mode": "soft",
        "toolCalls": 2,
        "warning": False,
        "stopped": False,
        "reason": None,
    }
    assert triggered(metrics, "soft_limit") == 0


async def test_soft_warns_at_the_soft_limit_without_stopping(metrics: Metrics) -> None:
    result = await run(make_flags("soft"), "SIM_TOOLS:calcular*4", metrics)

    assert report(result) == {
        "mode": "soft",
        "toolCalls": 4,
        "warning": True,
        "stopped": False,
        "reason": None,
    }
    assert result.stop_reason == "answered"
    assert triggered(metrics, "soft_limit") == 1  # once per run, not once per call past it


async def test_soft_stops_at_the_hard_limit_with_a_final_answer(metrics: Metrics) -> None:
    tools = Counted()
    result = await run(make_flags("soft"), "SIM_TOOLS:contar*30", metrics, tools)

    assert report(result) == {
        "mode": "soft",
        "toolCalls": 5,
        "warning": True,
        "stopped": True,
        "reason": "hard_limit",
    }
    assert tools.runs == 5
    assert len(result.tools_used) == 5
    assert result.stop_reason == "hard_limit"
    assert "pedi 5 chamada(s)" in result.text  # the model's own answer, not an error
    assert triggered(metrics, "hard_limit") == 1
    assert triggered(metrics, "soft_limit") == 1


async def test_soft_runs_only_the_calls_that_fit_under_the_hard_limit(metrics: Metrics) -> None:
    tools = Counted()
    # Turns of 5 then 5: after the first, only 2 more fit under a hard limit of 7.
    result = await run(
        make_flags("soft", guardrail_hard_limit=7), "SIM_TOOLS:contar*10", metrics, tools
    )

    assert tools.runs == 7
    assert report(result)["toolCalls"] == 7
    assert report(result)["reason"] == "hard_limit"
    # The calls left out still get an (error) result, so the history stays valid.
    last_results = result.new_messages[-2].content
    results = [b for b in last_results if isinstance(b, ToolResultBlock)]
    assert results == list(last_results)  # the note asking for a final answer is not stored
    assert [r.is_error for r in results] == [False, False, True, True, True]
    assert "Não executada" in results[-1].content


async def test_soft_does_not_act_on_repetition(metrics: Metrics) -> None:
    result = await run(
        make_flags("soft", guardrail_hard_limit=10), "SIM_REPEAT:calcular*4", metrics
    )

    assert report(result) == {
        "mode": "soft",
        "toolCalls": 4,
        "warning": True,
        "stopped": False,
        "reason": None,
    }
    assert triggered(metrics, "repetition") == 0


# --------------------------------------------------------------------------- full


async def test_full_stops_on_repeated_identical_calls(metrics: Metrics) -> None:
    tools = Counted()
    result = await run(
        make_flags("full", guardrail_soft_limit=4), "SIM_REPEAT:contar*5", metrics, tools
    )

    assert report(result) == {
        "mode": "full",
        "toolCalls": 3,
        "warning": False,
        "stopped": True,
        "reason": "repetition",
    }
    assert tools.runs == 3
    assert result.stop_reason == "repetition"
    assert result.text.startswith("SIM_REPEAT:contar*5: pedi 3 chamada(s)")
    assert triggered(metrics, "repetition") == 1
    assert triggered(metrics, "hard_limit") == 0


async def test_full_stops_at_the_hard_limit_too(metrics: Metrics) -> None:
    tools = Counted()
    result = await run(make_flags("full"), "SIM_TOOLS:contar*8", metrics, tools)

    # SIM_TOOLS:contar inputs differ ({"n": 1}, {"n": 2}, ...): no repetition, hard limit.
    assert report(result)["reason"] == "hard_limit"
    assert report(result)["stopped"] is True
    assert tools.runs == 5


async def test_full_varied_calls_below_the_limits_run_to_the_end(metrics: Metrics) -> None:
    result = await run(make_flags("full", guardrail_soft_limit=4), "SIM_TOOLS:calcular*3", metrics)

    assert report(result) == {
        "mode": "full",
        "toolCalls": 3,
        "warning": False,
        "stopped": False,
        "reason": None,
    }
    assert result.stop_reason == "answered"


# --------------------------------------------------------------------------- dry-run


async def test_dry_run_never_changes_the_run_but_names_the_would_be_stop(
    metrics: Metrics,
) -> None:
    tools = Counted()
    result = await run(make_flags("dry-run"), "SIM_TOOLS:contar*8", metrics, tools)

    assert report(result) == {
        "mode": "dry-run",
        "toolCalls": 8,
        "warning": True,
        "stopped": False,
        "reason": "hard_limit",
    }
    assert tools.runs == 8
    assert result.stop_reason == "answered"
    assert "recebi 8 resultado(s) de ferramenta, 0 com erro" in result.text
    # Measured like the real thing, so the dashboards can be checked before enforcing.
    assert triggered(metrics, "hard_limit") == 1
    assert triggered(metrics, "soft_limit") == 1


async def test_dry_run_reports_would_be_repetition(metrics: Metrics) -> None:
    tools = Counted()
    result = await run(
        make_flags("dry-run", guardrail_soft_limit=10, guardrail_hard_limit=10),
        "SIM_REPEAT:contar*5",
        metrics,
        tools,
    )

    assert report(result) == {
        "mode": "dry-run",
        "toolCalls": 5,
        "warning": False,
        "stopped": False,
        "reason": "repetition",
    }
    assert tools.runs == 5
    assert triggered(metrics, "repetition") == 1


async def test_dry_run_and_off_produce_the_same_answer_as_unguarded() -> None:
    text = "SIM_TOOLS:calcular*8"
    dry = await run(make_flags("dry-run"), text)
    off = await run(make_flags("off"), text)

    assert dry.text == off.text
    assert dry.tools_used == off.tools_used
    assert dry.turns == off.turns


# --------------------------------------------------------------------------- off


@pytest.mark.parametrize(("mode", "enable"), [("off", True), ("full", False)])
async def test_off_counts_nothing(mode: str, enable: bool, metrics: Metrics) -> None:
    tools = Counted()
    result = await run(make_flags(mode, enable=enable), "SIM_TOOLS:contar*8", metrics, tools)

    assert result.guardrail is None
    assert tools.runs == 8
    assert result.stop_reason == "answered"
    for reason in ("soft_limit", "hard_limit", "repetition"):
        assert triggered(metrics, reason) == 0


# --------------------------------------------------------------------------- runtime


async def test_a_runtime_flag_change_applies_to_the_next_run() -> None:
    flags = make_flags("soft")
    first = await run(flags, "SIM_REPEAT:calcular*4")

    flags.set({"guardrail_mode": "full"})
    second = await run(flags, "SIM_REPEAT:calcular*4")

    flags.set({"enable_guardrails": False})
    third = await run(flags, "SIM_REPEAT:calcular*4")

    assert report(first)["stopped"] is False
    assert report(second)["reason"] == "repetition"
    assert third.guardrail is None


async def test_a_flag_change_during_a_run_does_not_change_that_run() -> None:
    flags = make_flags("soft")
    sim = SimulatorProvider()
    inner = sim_turn(sim)

    async def call_model(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> Turn:
        flags.set({"guardrail_mode": "off", "guardrail_hard_limit": 100})
        return await inner(messages, tools)

    loop = AgentLoop(Counted().registry, flags)
    result = await loop.run([Message.text("user", "SIM_TOOLS:contar*30")], call_model)

    assert report(result)["mode"] == "soft"
    assert report(result)["reason"] == "hard_limit"
    assert len(result.tools_used) == 5


async def test_concurrent_runs_keep_separate_counts() -> None:
    flags = make_flags("full")

    repeated, varied = await asyncio.gather(
        run(flags, "SIM_REPEAT:calcular*5"), run(flags, "SIM_TOOLS:calcular*2")
    )

    assert report(repeated)["reason"] == "repetition"
    assert report(varied) == {
        "mode": "full",
        "toolCalls": 2,
        "warning": False,
        "stopped": False,
        "reason": None,
    }


# --------------------------------------------------------------------------- RunGuard unit


def use(name: str, **args: Any) -> ToolUseBlock:
    return ToolUseBlock(f"id-{name}", name, args)


def guard(mode: Mode = "full", soft: int = 3, hard: int = 5, repetition: int = 3) -> RunGuard:
    return RunGuard(mode, soft_limit=soft, hard_limit=hard, repetition_limit=repetition)


def test_admit_returns_the_prefix_that_fits() -> None:
    g = guard("soft")
    assert g.admit([use("a", n=i) for i in range(4)]) == 4
    assert g.admit([use("a", n=i) for i in range(4, 8)]) == 1
    assert g.admit([use("a", n=9)]) == 0
    assert g.report() == GuardrailReport("soft", 5, True, True, "hard_limit")


def test_repetition_counts_identical_calls_whatever_the_key_order() -> None:
    g = guard("full", soft=10, hard=10)
    assert g.admit([use("kb", q="x", n=1), use("kb", n=1, q="x")]) == 2
    assert g.stop_reason is None
    # Parallel identical calls in one turn count exactly like sequential ones.
    assert g.admit([use("kb", q="x", n=1), use("kb", q="x", n=1)]) == 1
    assert g.stop_reason == "repetition"


def test_a_different_call_resets_the_repetition_streak() -> None:
    g = guard("full", soft=10, hard=10)
    calls = [use("a"), use("a"), use("b"), use("a"), use("a"), use("a", x=1)]
    assert g.admit(calls) == 6
    assert g.stop_reason is None


def test_off_reports_nothing() -> None:
    g = guard("off")
    assert g.admit([use("a")] * 50) == 50
    assert g.report() is None
    assert g.stop_reason is None


def test_start_reads_the_effective_mode() -> None:
    assert RunGuard.start(load_settings(guardrail_mode="full")).mode == "off"
    settings = load_settings(enable_guardrails=True, guardrail_mode="dry-run")
    assert RunGuard.start(settings).mode == "dry-run"
