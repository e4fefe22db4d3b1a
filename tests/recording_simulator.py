"""The simulator plus a record of the requests it received — for tests only.

The production `SimulatorProvider` keeps no record: a list of every request kept each turn's
history window alive for the life of the process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from rom_agent.domain.messages import (
    ChatRequest,
    ChatResponse,
    StreamEvent,
)
from rom_agent.providers.simulator import SimulatorProvider


class RecordingSimulator(SimulatorProvider):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls: list[ChatRequest] = []

    async def complete(self, request: ChatRequest) -> ChatResponse:
        self.calls.append(request)
        return await super().complete(request)

    def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        self.calls.append(request)
        return super().stream(request)
