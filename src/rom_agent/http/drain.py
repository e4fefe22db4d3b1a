"""Requests in flight on the routes that drain, whatever the admission flags.

The bottleneck counts only while admission control is on; a deploy's SIGTERM must wait for
running chat requests in every configuration (the default has it off). The route table wraps
every draining route (`ApiRoute(..., drains=True)`) in `InFlight.track`: once draining starts,
new requests get 503 `DRAINING` and `drained()` returns when the last running one has ended
(streams included: the handler returns only after the whole body is sent).
"""

from __future__ import annotations

import asyncio

from rom_agent.http.errors import ApiError


class InFlight:
    def __init__(self) -> None:
        self._running = 0
        self._draining = False
        self._idle: asyncio.Event | None = None

    @property
    def running(self) -> int:
        return self._running

    @property
    def draining(self) -> bool:
        return self._draining

    def enter(self) -> None:
        """Count one request in, or refuse it (503 `DRAINING`) once draining has started."""
        if self._draining:
            raise ApiError(
                503,
                "DRAINING",
                "service is shutting down; retry on another instance",
                headers={"Retry-After": "1", "Connection": "close"},
            )
        self._running += 1

    def exit(self) -> None:
        self._running -= 1
        if self._running == 0 and self._idle is not None:
            self._idle.set()

    def start_draining(self) -> None:
        self._draining = True

    async def drained(self, timeout_s: float) -> bool:
        """Wait until no tracked request runs; False if `timeout_s` passed first."""
        if self._running == 0:
            return True
        self._idle = asyncio.Event()
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return self._running == 0
        return True
