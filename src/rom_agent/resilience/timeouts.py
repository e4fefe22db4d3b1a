"""Timeouts measured on the pipeline's clock.

Production uses `asyncio.timeout` (one timer handle, no task). Any other clock (a `FakeClock`
in tests) gets the same `asyncio.Timeout` machinery fired by a watcher task that sleeps on that
clock, so virtual time drives timeouts exactly as real time does.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any

from rom_agent.resilience.clock import Clock, SystemClock

TimeoutFactory = Callable[[float], AbstractAsyncContextManager[Any]]


class _ClockTimeout:
    """`asyncio.timeout(seconds)` measured on an arbitrary `Clock`.

    A watcher task sleeps on the clock and then expires a real `asyncio.Timeout`, so the
    cancellation and TimeoutError semantics are the stdlib's own.
    """

    __slots__ = ("_clock", "_seconds", "_timeout", "_watcher")

    def __init__(self, clock: Clock, seconds: float) -> None:
        self._clock = clock
        self._seconds = seconds
        self._timeout = asyncio.timeout(None)
        self._watcher: asyncio.Task[None] | None = None

    async def __aenter__(self) -> None:
        await self._timeout.__aenter__()
        loop = asyncio.get_running_loop()
        if self._seconds <= 0:
            self._timeout.reschedule(loop.time())
        else:
            self._watcher = loop.create_task(self._expire())

    async def _expire(self) -> None:
        await self._clock.sleep(self._seconds)
        self._timeout.reschedule(asyncio.get_running_loop().time())

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        if self._watcher is not None:
            self._watcher.cancel()
        await self._timeout.__aexit__(exc_type, exc, tb)  # raises TimeoutError itself
        return None


def clock_timeouts(clock: Clock) -> TimeoutFactory:
    """The timeout factory matching `clock`: the event loop's own timers for the system
    clock (whose sleep *is* asyncio.sleep), a clock-driven watcher for anything else."""
    if isinstance(clock, SystemClock):
        return asyncio.timeout
    return functools.partial(_ClockTimeout, clock)
