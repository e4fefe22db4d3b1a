"""Issue 12 #2 (last part): the whole-run deadline of `ChatService.chat` runs on the pipeline's
clock, like every attempt's timer — so virtual time ends a run stuck outside the pipeline (a
tool) exactly at its deadline, and production's loop clock is the one source for both."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from rom_agent.agent.chat import ChatService, ChatTurn
from rom_agent.agent.loop import AgentLoop
from rom_agent.agent.tools import ToolRegistry
from rom_agent.domain.messages import (
    ChatRequest,
    ChatResponse,
    Message,
    ToolUseBlock,
    Usage,
)
from rom_agent.resilience.errors import DeadlineExceededError
from rom_agent.store.backend import StoredMessage
from tests.scripted_provider import SIM1, make_harness


class NoHistory:
    def __init__(self) -> None:
        self.appended: list[Sequence[Message]] = []

    async def history(self, conversation_id: str, limit: int) -> list[Message]:
        return []

    async def append(
        self, conversation_id: str, messages: Sequence[Message], *, model: str | None
    ) -> None:
        self.appended.append(messages)

    async def get(self, conversation_id: str) -> list[StoredMessage] | None:
        return None

    async def ping(self) -> float:
        return 0.0


class AsksForTheTool:
    name = "simulator"

    async def complete(self, request: ChatRequest) -> ChatResponse:
        use = ToolUseBlock("t1", "esperar", {})
        return ChatResponse(request.model, (use,), "tool_use", Usage(1, 1))

    def stream(self, request: ChatRequest) -> Any:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


async def test_the_whole_run_deadline_fires_on_the_pipeline_clock() -> None:
    h = make_harness(request_timeout_s=30)
    h.pipeline._runner._providers = {"simulator": AsksForTheTool()}  # type: ignore[attr-defined]
    entered = asyncio.Event()
    registry = ToolRegistry()

    async def esperar(args: dict[str, Any]) -> str:
        entered.set()
        await asyncio.Event().wait()  # only the run's deadline ends this
        return "never"

    registry.register("esperar", "waits", {"type": "object"}, esperar, timeout_s=3600)
    store = NoHistory()
    service = ChatService(
        flags=h.flags,
        conversations=store,
        pipeline=h.pipeline,
        agent=AgentLoop(registry, h.flags, h.events, h.clock),
        clock=h.clock,
    )
    turn = ChatTurn("hi", "c1", (SIM1,), deadline=h.pipeline.new_deadline())
    run = asyncio.create_task(service.chat(turn))
    await asyncio.wait_for(entered.wait(), 5)
    h.clock.advance(29.999)
    await asyncio.sleep(0)
    assert not run.done()
    h.clock.advance(0.001)  # virtual time reaches the deadline: the run ends now
    with pytest.raises(DeadlineExceededError):
        await asyncio.wait_for(run, 5)  # real-time guard: a loop-clock timer would hang 30 s
    assert store.appended == []
