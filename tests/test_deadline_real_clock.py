"""Issue 12 #2: a request deadline that binds is reported as the deadline (504, not counted),
never as the model's attempt timeout (502, counted) — on production's event loop (uvloop)
and on asyncio's, with the real clock and real timers.

The deadline is decided from which budget was the shorter when the timer was armed, not by
reading a clock after it fired: uvloop fires timers on its cached millisecond clock, so a
re-read of `time.monotonic()` can land before the deadline it has just enforced.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import uvloop

from rom_agent.domain.events import Events
from rom_agent.domain.messages import (
    ChatRequest,
    ChatResponse,
    Message,
    StreamEvent,
)
from rom_agent.instrumentation.prometheus import PrometheusMetrics
from rom_agent.resilience.breaker import BreakerRegistry
from rom_agent.resilience.clock import SystemClock
from rom_agent.resilience.errors import DeadlineExceededError
from rom_agent.resilience.pipeline import ModelCall, Pipeline
from tests.scripted_provider import MODELS, SIM1, SIM2, make_flags

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.new_event_loop,
}
REQUESTS = 200
# Deadlines of 5 ms plus a varying fraction of a millisecond: uvloop's millisecond timers then
# fire up to ~1 ms before the exact deadline in a good share of the requests.
DEADLINES_S = [0.005 + (index % 10) * 0.0001 for index in range(REQUESTS)]


class Hanging:
    """Answers nothing until cancelled; counts calls per model."""

    name = "simulator"

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    async def complete(self, request: ChatRequest) -> ChatResponse:
        self.calls[request.model] = self.calls.get(request.model, 0) + 1
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        self.calls[request.model] = self.calls.get(request.model, 0) + 1
        await asyncio.sleep(3600)
        yield  # type: ignore[misc]

    async def aclose(self) -> None:
        pass


async def _run(streaming: bool) -> tuple[list[BaseException | None], Hanging, PrometheusMetrics]:
    flags = make_flags(
        enable_circuit_breaker=True,
        enable_retry=True,
        enable_metrics=True,
        circuit_breaker_threshold=1000,
        attempt_timeout_s=60,
        first_token_timeout_s=60,
    )
    clock = SystemClock(seed=1)
    metrics = PrometheusMetrics(lambda: True, MODELS)
    events = Events()
    metrics.listen(events, flags)
    breakers = BreakerRegistry(flags, clock, events)
    provider = Hanging()
    pipeline = Pipeline(flags, {"simulator": provider}, breakers, events, clock)

    async def one(deadline_s: float) -> BaseException | None:
        call = ModelCall(
            messages=(Message.text("user", "hi"),),
            chain=(SIM1, SIM2),
            deadline=clock.now() + deadline_s,
        )
        try:
            if streaming:
                async for _ in pipeline.stream(call):
                    pass
            else:
                await pipeline.complete(call)
        except Exception as exc:
            return exc
        return None

    # One after the other, as requests arriving over time (a timer armed right after the
    # previous one fired is where uvloop's cached clock shows).
    outcomes = [await one(deadline_s) for deadline_s in DEADLINES_S]
    return outcomes, provider, metrics


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
@pytest.mark.parametrize("loop", list(LOOPS))
def test_a_binding_deadline_is_the_deadline_never_the_model(loop: str, streaming: bool) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        outcomes, provider, metrics = runner.run(_run(streaming))
    kinds = [type(outcome).__name__ for outcome in outcomes]
    assert kinds == ["DeadlineExceededError"] * REQUESTS
    assert all(isinstance(outcome, DeadlineExceededError) for outcome in outcomes)
    # Not the first model's failure (not counted), and the second one was never blamed.
    for model in MODELS:
        failures = metrics.registry.get_sample_value(
            "circuit_breaker_failure_total", {"operation": "converse", "model": model}
        )
        assert failures == 0, model
    # The first model was called (unless the deadline passed before the attempt could start,
    # which a loaded machine can make happen); the second one never.
    assert 0 < provider.calls[SIM1.id] <= REQUESTS
    assert SIM2.id not in provider.calls
