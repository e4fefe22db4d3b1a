"""Test support for the resilience layers: a scriptable in-memory provider, a virtual-time
driver for `FakeClock`, and a harness wiring the pipeline the way the app does.

Resilience is tested in-process on purpose: every timing is virtual, so a 60 s attempt timeout
or a 30 s cooldown costs microseconds and is asserted exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
import uvloop

from rom_agent.config import load_settings
from rom_agent.domain.errors import (
    ErrorKind,
    ProviderError,
)
from rom_agent.domain.events import Events
from rom_agent.domain.messages import (
    ChatRequest,
    ChatResponse,
    Message,
    ModelRef,
    StopEvent,
    StreamEvent,
    TextBlock,
    TextDelta,
    Usage,
    UsageEvent,
)
from rom_agent.flags import FlagStore
from rom_agent.instrumentation.prometheus import PrometheusMetrics as Metrics
from rom_agent.resilience.breaker import BreakerRegistry
from rom_agent.resilience.clock import FakeClock
from rom_agent.resilience.faults import FaultPlan
from rom_agent.resilience.pipeline import ModelCall, Pipeline

T = TypeVar("T")
DEFAULT_USAGE = Usage(10, 5)

MODELS = ("rom-sim-1", "rom-sim-2")
SIM1 = ModelRef("simulator", "rom-sim-1")
SIM2 = ModelRef("simulator", "rom-sim-2")


def make_flags(**overrides: Any) -> FlagStore:
    """A flag store isolated from any `.env` in the working directory."""
    return FlagStore(load_settings(_env_file=None, **overrides))


# --------------------------------------------------------------------------- script steps


class _Hang:
    """Never answers (until cancelled)."""

    def __repr__(self) -> str:
        return "HANG"


HANG = _Hang()


@dataclass(frozen=True)
class Reply:
    text: str = "ok"
    usage: Usage = DEFAULT_USAGE
    delay: float = 0.0  # virtual seconds before answering


@dataclass(frozen=True)
class Fail:
    error: BaseException
    delay: float = 0.0  # virtual seconds before failing


@dataclass(frozen=True)
class Stream:
    """Stream items: str → TextDelta, float → pause (virtual seconds), ProviderError → raised,
    HANG → hangs, StreamEvent → as is. `terminate` appends usage and the StopEvent."""

    items: tuple[Any, ...]
    terminate: bool = True
    usage: Usage = DEFAULT_USAGE

    @classmethod
    def of(cls, *items: Any, terminate: bool = True) -> Stream:
        return cls(items, terminate)


def transient(status: int = 503, **kwargs: Any) -> ProviderError:
    return ProviderError(ErrorKind.TRANSIENT, f"upstream {status}", status=status, **kwargs)


def model_error(message: str = "model unavailable", **kwargs: Any) -> ProviderError:
    return ProviderError(ErrorKind.MODEL, message, **kwargs)


def request_error(message: str = "bad request", **kwargs: Any) -> ProviderError:
    return ProviderError(ErrorKind.REQUEST, message, status=400, **kwargs)


# --------------------------------------------------------------------------- provider


class ScriptedProvider:
    """Answers each call with the next scripted step of its model (default: `Reply()`).

    Steps: `Reply`, `Fail`, an exception (raised), `HANG`, or — for `stream()` — `Stream`.
    """

    def __init__(self, clock: FakeClock, name: str = "simulator") -> None:
        self.name = name
        self.clock = clock
        self.requests: list[ChatRequest] = []
        self.streams_closed = 0
        self.streams_cancelled = 0
        self._scripts: dict[str, deque[Any]] = defaultdict(deque)

    def script(self, model: str, *steps: Any) -> ScriptedProvider:
        self._scripts[model].extend(steps)
        return self

    def calls(self, model: str | None = None) -> int:
        return sum(1 for r in self.requests if model is None or r.model == model)

    def _next(self, request: ChatRequest) -> Any:
        self.requests.append(request)
        script = self._scripts[request.model]
        return script.popleft() if script else Reply()

    async def complete(self, request: ChatRequest) -> ChatResponse:
        step = self._next(request)
        if isinstance(step, Stream):
            raise AssertionError("a Stream step was scripted for a complete() call")
        return await self._reply(request, step)

    async def _reply(self, request: ChatRequest, step: Any) -> ChatResponse:
        if step is HANG:
            await asyncio.get_running_loop().create_future()
        if isinstance(step, BaseException):
            raise step
        if step.delay:
            await self.clock.sleep(step.delay)
        if isinstance(step, Fail):
            raise step.error
        return ChatResponse(request.model, (TextBlock(step.text),), "end_turn", step.usage)

    def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        return self._stream(request, self._next(request))

    async def _stream(self, request: ChatRequest, step: Any) -> AsyncIterator[StreamEvent]:
        try:
            if not isinstance(step, Stream):
                response = await self._reply(request, step)
                step = Stream((response.text,), usage=response.usage)
            for item in step.items:
                if isinstance(item, str):
                    yield TextDelta(item)
                elif isinstance(item, float | int):
                    await self.clock.sleep(float(item))
                elif isinstance(item, ProviderError):
                    raise item
                elif item is HANG:
                    await asyncio.get_running_loop().create_future()
                else:
                    yield item
            if step.terminate:
                yield UsageEvent(step.usage)
                yield StopEvent("end_turn")
        except (asyncio.CancelledError, GeneratorExit):
            self.streams_cancelled += 1
            raise
        finally:
            self.streams_closed += 1

    async def aclose(self) -> None:
        pass


# --------------------------------------------------------------------------- virtual time


def next_wakeup(clock: FakeClock) -> float | None:
    # FakeClock keeps its sleepers private; peeking is the price of exact virtual time.
    live = [when for when, _, future in clock._sleepers if not future.done()]
    return min(live, default=None)


async def settle(rounds: int = 50) -> None:
    """Let every runnable task run until the loop is quiet."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def run(clock: FakeClock, awaitable: Awaitable[T], *, max_advances: int = 10_000) -> T:
    """Await `awaitable`, advancing virtual time to the next sleeper whenever all is quiet."""
    task = asyncio.ensure_future(awaitable)
    try:
        for _ in range(max_advances):
            await settle()
            if task.done():
                return task.result()
            wake = next_wakeup(clock)
            if wake is None:
                raise AssertionError("deadlock: the task waits on nothing the clock can wake")
            clock.advance(max(0.0, wake - clock.now()))
        raise AssertionError("too many clock advances")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def collect(items: AsyncIterator[T]) -> list[T]:
    return [item async for item in items]


# --------------------------------------------------------------------------- harness


@dataclass
class Harness:
    clock: FakeClock
    flags: FlagStore
    metrics: Metrics
    breakers: BreakerRegistry
    provider: ScriptedProvider
    pipeline: Pipeline
    events: Events
    chain: tuple[ModelRef, ...] = field(default=(SIM1, SIM2))

    def call(
        self,
        text: str = "hello",
        *,
        chain: tuple[ModelRef, ...] | None = None,
        fault: FaultPlan | None = None,
        timeout_s: float | None = None,
        **kwargs: Any,
    ) -> ModelCall:
        seconds = timeout_s if timeout_s is not None else self.flags.current.request_timeout_s
        return ModelCall(
            messages=(Message.text("user", text),),
            chain=chain if chain is not None else self.chain,
            deadline=self.clock.now() + seconds,
            fault=fault,
            **kwargs,
        )

    async def complete(self, call: ModelCall | None = None) -> Any:
        return await run(self.clock, self.pipeline.complete(call or self.call()))

    async def stream(self, call: ModelCall | None = None) -> list[Any]:
        return await run(self.clock, collect(self.pipeline.stream(call or self.call())))

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def state(self, model: str) -> str:
        return dict(self.breakers.states())[model]


def make_harness(**overrides: Any) -> Harness:
    """A pipeline over one scripted provider with virtual time (`autoadvance=False`)."""
    clock = FakeClock(autoadvance=False)
    flags = make_flags(**overrides)
    metrics = Metrics(lambda: flags.current.enable_metrics, MODELS)
    events = Events(metrics)
    breakers = BreakerRegistry(flags, clock, events)
    metrics.breaker_source = breakers
    provider = ScriptedProvider(clock)
    pipeline = Pipeline(flags, {"simulator": provider}, breakers, events, clock)
    return Harness(clock, flags, metrics, breakers, provider, pipeline, events)


# --------------------------------------------------------------------------- event loops


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """Import into a test module to run its async tests on asyncio's loop and on uvloop
    (production's): pytest-asyncio builds each test's loop from this policy."""
    if request.param == "uvloop":
        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()
