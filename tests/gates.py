"""A provider that holds every call until the test opens the gate (no timing involved)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable

from rom_agent.domain.messages import (
    ChatRequest,
    ChatResponse,
    StreamEvent,
)
from rom_agent.providers.simulator import SimulatorProvider


class GatedSimulator(SimulatorProvider):
    """The simulator, but each call first waits for `open()` (called from any thread)."""

    def __init__(self) -> None:
        super().__init__()
        self._gate: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opened = threading.Event()
        self.waiting = 0

    def _event(self) -> asyncio.Event:
        if self._gate is None:
            self._gate = asyncio.Event()
            self._loop = asyncio.get_running_loop()
            if self._opened.is_set():
                self._gate.set()
        return self._gate

    def open(self) -> None:
        self._opened.set()
        if self._loop is not None and self._gate is not None:
            self._loop.call_soon_threadsafe(self._gate.set)

    async def complete(self, request: ChatRequest) -> ChatResponse:
        self.waiting += 1
        try:
            await self._event().wait()
        finally:
            self.waiting -= 1
        return await super().complete(request)

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        self.waiting += 1
        try:
            await self._event().wait()
        finally:
            self.waiting -= 1
        async for event in super().stream(request):
            yield event


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll a condition set by another thread (a precondition wait, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.005)


async def until(condition: Callable[[], bool]) -> None:
    """`wait_until` for async tests: poll state owned by the server's thread (bounded)."""
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110 - the state lives on another thread
            await asyncio.sleep(0.005)
