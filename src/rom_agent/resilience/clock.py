"""Time and randomness as injectable dependencies, so no test ever sleeps.

Production code takes a `Clock`; tests pass a `FakeClock` whose `sleep` advances virtual time
instantly and whose `advance()` moves time forward by hand.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
import time
from dataclasses import dataclass, field
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds."""
        ...

    async def sleep(self, seconds: float) -> None: ...

    def random(self) -> float:
        """Uniform in [0, 1)."""
        ...


class SystemClock:
    """The real thing: the running event loop's clock, `asyncio.sleep`, and a private
    `random.Random`.

    `now()` reads the clock the loop's timers run on (`loop.time()`), so a deadline computed
    from `now()` and a timer armed for it agree: uvloop's clock is millisecond-grained and
    cached per iteration, and mixing it with `time.monotonic()` made a deadline timer look
    like it fired early. Outside a running loop (startup, threads) it is `time.monotonic()`,
    the same base both loops use.
    """

    __slots__ = ("_rng",)

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def now(self) -> float:
        try:
            return asyncio.get_running_loop().time()
        except RuntimeError:
            return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def random(self) -> float:
        return self._rng.random()


@dataclass
class FakeClock:
    """Virtual time. `sleep(d)` suspends the caller until `advance()` passes its wake-up time,
    or — with `autoadvance=True` (the default) — jumps time forward at once.

    `random()` draws from a seeded generator, so jittered delays can be asserted exactly.
    """

    start: float = 1000.0
    seed: int = 0
    autoadvance: bool = True
    _now: float = field(init=False)
    _rng: random.Random = field(init=False)
    _sleepers: list[tuple[float, int, asyncio.Future[None]]] = field(
        init=False, default_factory=list
    )
    _seq: itertools.count[int] = field(init=False, default_factory=itertools.count)
    slept: list[float] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self._now = self.start
        self._rng = random.Random(self.seed)

    def now(self) -> float:
        return self._now

    def random(self) -> float:
        return self._rng.random()

    async def sleep(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.slept.append(seconds)
        if self.autoadvance:
            self._now += seconds
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), future))
        await future

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper whose deadline has passed."""
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)
