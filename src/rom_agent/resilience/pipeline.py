"""The resilience pipeline: every protection around one model turn, in SPEC order.

    fallback chain over models                          (attempts.py, fallback.py)
      → per model: retry (with budget)                  (attempts.py, retry.py)
          → circuit breaker (every attempt holds a permit)   (breaker.py)
              → attempt timeout: min(ATTEMPT_TIMEOUT_S, time left to the request deadline)
                  → fault plan (drills only) → provider      (timeouts.py, faults.py)

Streams add a commit point and a post-commit state machine (stream.py), a hedged first token
(hedge.py) and mid-stream continuation (continuation.py), put together in failover.py. This
module is the facade the agent loop and the OpenAI facade call; it holds no logic of its own
beyond wiring.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from rom_agent.domain.events import Events
from rom_agent.domain.messages import ChatResponse, ModelRef
from rom_agent.flags import FlagStore
from rom_agent.providers.base import Provider
from rom_agent.resilience.attempts import Attempt, AttemptRunner
from rom_agent.resilience.breaker import BreakerRegistry
from rom_agent.resilience.calls import ModelCall, PipelineResult, StreamItem, StreamStart
from rom_agent.resilience.clock import Clock
from rom_agent.resilience.errors import ATTEMPT_TIMEOUT
from rom_agent.resilience.failover import run_stream
from rom_agent.resilience.fallback import ChainRun, build_chain
from rom_agent.resilience.hedge import Hedging
from rom_agent.resilience.retry import Retry
from rom_agent.resilience.timeouts import TimeoutFactory, clock_timeouts

__all__ = ["ModelCall", "Pipeline", "PipelineResult", "StreamItem", "StreamStart"]


class Pipeline:
    """Runs model turns through every protection. One per process; all state lives in the
    breaker registry and the retry budgets, so concurrent requests share them."""

    def __init__(
        self,
        flags: FlagStore,
        providers: Mapping[str, Provider],
        breakers: BreakerRegistry,
        events: Events,
        clock: Clock,
        *,
        retry: Retry | None = None,
        timeout: TimeoutFactory | None = None,
    ) -> None:
        self._flags = flags
        self._events = events
        self._clock = clock
        self._runner = AttemptRunner(
            flags,
            providers,
            breakers,
            events,
            clock,
            retry if retry is not None else Retry(flags, clock, events),
            timeout if timeout is not None else clock_timeouts(clock),
        )
        self._hedging = Hedging(clock)
        # MODEL_CHAIN needs a restart to change, so it is parsed once.
        self.chain: tuple[ModelRef, ...] = tuple(
            ModelRef.parse(qualified) for qualified in flags.current.model_chain
        )

    def chain_for(
        self, primary: str | None = None, fallbacks: Sequence[str] | None = None
    ) -> tuple[ModelRef, ...]:
        """The chain of one request (see `fallback.build_chain`); ValueError if unknown."""
        return build_chain(self.chain, primary, fallbacks)

    def new_deadline(self) -> float:
        """A request deadline REQUEST_TIMEOUT_S from now, on the pipeline's clock."""
        return self._clock.now() + self._flags.current.request_timeout_s

    def timeout_at(self, deadline: float) -> AbstractAsyncContextManager[Any]:
        """`async with` bound that fires at `deadline` on the pipeline's clock and timers (a
        whole run's deadline: one time source with every attempt's)."""
        return self._runner.timeout(max(0.0, deadline - self._clock.now()))

    async def complete(self, call: ModelCall) -> PipelineResult:
        run = ChainRun(call.chain, self._events)
        response, index = await self._runner.walk(call, run, self._complete_once)
        return PipelineResult(response, call.chain[index], index > 0, run.attempts, run.tried)

    async def _complete_once(self, attempt: Attempt) -> ChatResponse:
        runner = self._runner
        try:
            async with runner.timeout(attempt.budget_s):
                if attempt.fault is not None:
                    response = await attempt.fault.complete(
                        attempt.provider, attempt.request, self._clock
                    )
                else:
                    response = await attempt.provider.complete(attempt.request)
        except TimeoutError:
            raise runner.timed_out(
                attempt, attempt.budget_s, ATTEMPT_TIMEOUT, deadline=attempt.deadline_binds
            ) from None
        runner.succeeded(attempt, response.usage)
        return response

    def stream(self, call: ModelCall) -> AsyncGenerator[StreamItem, None]:
        """`StreamStart`, then the winning upstream's events: content, `UsageEvent`s, and
        `StopEvent` always last. Ends cleanly only after the upstream's terminator; otherwise
        raises `StreamInterruptedError`. Before `StreamStart` it may raise any pipeline
        error (`CircuitOpenError`, `UpstreamFailedError`, ...), exactly like `complete()`."""
        return run_stream(self._runner, self._hedging, call)
