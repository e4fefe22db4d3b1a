"""The attempt walk: fallback chain → per model retry (with budget) → breaker permit → one
provider attempt sized min(ATTEMPT_TIMEOUT_S, time left to the request deadline).

One deadline (`ModelCall.deadline`, absolute clock time) covers every retry and fallback; once
it has passed no further attempt is made (`DeadlineExceededError`). A timeout caused by the
deadline rather than by ATTEMPT_TIMEOUT_S is not the model's fault and is not counted.

What one attempt does (a complete call, or opening a stream up to its first token) is the
`once` body the caller passes; this module settles every outcome the body does not.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from rom_agent.config import Settings
from rom_agent.domain.errors import ErrorKind, ProviderError
from rom_agent.domain.events import (
    AttemptFinished,
    AttemptStarted,
    Events,
)
from rom_agent.domain.messages import ChatRequest, ModelRef, Usage
from rom_agent.flags import FlagStore
from rom_agent.logs import get_logger
from rom_agent.providers.base import Provider
from rom_agent.resilience.breaker import BreakerRegistry
from rom_agent.resilience.breaker_states import BreakerOpen, BreakerPermit
from rom_agent.resilience.calls import ModelCall
from rom_agent.resilience.clock import Clock
from rom_agent.resilience.errors import (
    CIRCUIT_OPEN,
    MODEL_ERROR,
    AttemptFailure,
    DeadlineExceededError,
    RequestRejectedError,
    failure_reason,
)
from rom_agent.resilience.fallback import ChainRun
from rom_agent.resilience.faults import FaultPlan
from rom_agent.resilience.retry import Retry
from rom_agent.resilience.timeouts import TimeoutFactory

log = get_logger(__name__)

T = TypeVar("T")


@dataclass(slots=True)
class Attempt:
    """One provider attempt: everything an attempt body needs."""

    call: ModelCall
    run: ChainRun
    model: ModelRef
    provider: Provider
    permit: BreakerPermit
    request: ChatRequest
    fault: FaultPlan | None
    started: float
    budget_s: float  # min(ATTEMPT_TIMEOUT_S, time left)
    # The request deadline, not ATTEMPT_TIMEOUT_S, set `budget_s`: a timer armed for it that
    # fires is the deadline's (decided here, when armed, never by re-reading a clock).
    deadline_binds: bool


AttemptBody = Callable[[Attempt], Awaitable[T]]


class _LeaveModel(Exception):
    """Control flow: leave this model for the next one of the chain."""

    def __init__(self, failure: AttemptFailure, retry_after_s: float | None = None) -> None:
        self.failure = failure
        self.retry_after_s = retry_after_s


class RetryRefused(Exception):
    """The retry budget has no room for another attempt on `model`."""

    def __init__(self, model: str) -> None:
        super().__init__(f"retry budget of {model} exhausted")
        self.model = model


class AttemptRunner:
    """Walks a call down its chain, one attempt at a time, and reports every outcome."""

    def __init__(
        self,
        flags: FlagStore,
        providers: Mapping[str, Provider],
        breakers: BreakerRegistry,
        events: Events,
        clock: Clock,
        retry: Retry,
        timeout: TimeoutFactory,
    ) -> None:
        self.flags = flags
        self.events = events
        self.clock = clock
        self.timeout = timeout
        self._providers = providers
        self._breakers = breakers
        self._retry = retry

    # ------------------------------------------------------------------ the walk

    async def walk(self, call: ModelCall, run: ChainRun, once: AttemptBody[T]) -> tuple[T, int]:
        """Fallback chain: each model in turn until one answers."""
        for index, model in enumerate(call.chain):
            try:
                result = await self._try_model(call, run, index, model, once)
            except _LeaveModel as leave:
                if leave.retry_after_s is not None:
                    run.rejected(index, leave.failure, leave.retry_after_s)
                else:
                    run.failed(index, leave.failure)
                continue
            run.succeeded(index)
            return result, index
        raise run.exhausted()

    async def single(
        self, call: ModelCall, run: ChainRun, model: ModelRef, once: AttemptBody[T]
    ) -> T:
        """Exactly one attempt on `model`, outside the walk (a stream continuation): the
        breaker must admit it (`BreakerOpen` otherwise) and the retry budget must have room
        (`RetryRefused` otherwise); failures are settled as in the walk and raised."""
        provider = self._providers.get(model.provider)
        if provider is None:
            raise ProviderError(ErrorKind.MODEL, f"provider {model.provider!r} is not configured")
        settings = self.flags.current
        permit = self._breakers.acquire(model.id)
        if not self._retry.spend(model.id, settings):
            permit.record_ignored()
            raise RetryRefused(model.id)
        run.attempts += 1
        return await self._attempt(call, run, model, provider, permit, settings, once)

    async def _try_model(
        self, call: ModelCall, run: ChainRun, index: int, model: ModelRef, once: AttemptBody[T]
    ) -> T:
        """Retry loop of one model."""
        provider = self._providers.get(model.provider)
        if provider is None:
            message = f"provider {model.provider!r} is not configured"
            failure = AttemptFailure(model.id, MODEL_ERROR, ErrorKind.MODEL.value, None, message)
            raise _LeaveModel(failure)
        settings = self.flags.current
        calls = 0
        last_error: ProviderError | None = None
        while True:
            if self.clock.now() >= call.deadline:
                raise DeadlineExceededError(run.tried)
            try:
                permit = self._breakers.acquire(model.id)
            except BreakerOpen as rejection:
                if last_error is not None:  # opened under our retries: the model failed
                    failure = AttemptFailure.from_error(model.id, last_error, calls)
                    raise _LeaveModel(failure) from None
                message = f"breaker {rejection.state.value}"
                failure = AttemptFailure(model.id, CIRCUIT_OPEN, None, None, message)
                raise _LeaveModel(failure, rejection.retry_after_s) from None
            if calls == 0:
                run.calling(index)
                self._retry.begin(model.id, settings)
            calls += 1
            run.attempts += 1
            try:
                return await self._attempt(call, run, model, provider, permit, settings, once)
            except ProviderError as error:
                settings = self.flags.current
                if error.kind is ErrorKind.REQUEST or (
                    error.kind is ErrorKind.POLICY and not settings.content_policy_fallback
                ):
                    raise RequestRejectedError(model.id, error) from error
                delay = self._retry.delay_before_retry(
                    model.id,
                    error,
                    calls - 1,
                    call.deadline,
                    settings,
                    # Our own failures may just have opened the breaker: consult it before
                    # sleeping a backoff it would answer with a refusal.
                    refused_for_s=self._breakers.get(model.id).retry_after_s(),
                )
                if delay is None:
                    raise _LeaveModel(AttemptFailure.from_error(model.id, error, calls)) from error
                last_error = error
            await self.clock.sleep(delay)

    async def _attempt(
        self,
        call: ModelCall,
        run: ChainRun,
        model: ModelRef,
        provider: Provider,
        permit: BreakerPermit,
        settings: Settings,
        once: AttemptBody[T],
    ) -> T:
        """One provider attempt under a breaker permit. The body records success itself (a
        stream only knows at its end); every other outcome is settled here."""
        started = self.clock.now()
        left_s = call.deadline - started
        deadline_binds = left_s <= settings.attempt_timeout_s
        budget_s = left_s if deadline_binds else settings.attempt_timeout_s
        request = ChatRequest(
            model=model.id,
            messages=call.messages,
            system=call.system,
            tools=call.tools,
            max_tokens=call.max_tokens,
            temperature=call.temperature,
            options=call.options,
            timeout_s=budget_s,
            hints=call.hints,
        )
        fault = call.fault if call.fault is not None and call.fault.affects(model.id) else None
        attempt = Attempt(
            call, run, model, provider, permit, request, fault, started, budget_s, deadline_binds
        )
        self.events.emit(AttemptStarted, model.id)
        try:
            return await once(attempt)
        except ProviderError as error:
            self.failed(attempt, error)
            raise
        except DeadlineExceededError:
            permit.record_ignored()
            self.finished(attempt, "timeout")
            raise
        except asyncio.CancelledError:
            permit.record_ignored()
            self.finished(attempt, "cancelled")
            raise
        except Exception as exc:
            # A provider broke its contract (errors must be ProviderError). Treat it as an
            # upstream failure so the breaker and the fallback still protect the request.
            log.exception("unclassified provider error", model=model.qualified)
            wrapped = ProviderError(
                ErrorKind.TRANSIENT,
                f"unexpected {type(exc).__name__} from provider {model.provider}",
                error_type=type(exc).__name__,
                retryable=False,
            )
            self.failed(attempt, wrapped)
            raise wrapped from exc

    # ------------------------------------------------------------------ outcomes

    def finished(self, attempt: Attempt, outcome: str, usage: Usage | None = None) -> None:
        elapsed = self.clock.now() - attempt.started
        if usage is None:
            self.events.emit(AttemptFinished, attempt.model.id, outcome, elapsed)
        else:
            self.events.emit(
                AttemptFinished,
                attempt.model.id,
                outcome,
                elapsed,
                usage.input_tokens,
                usage.output_tokens,
            )

    def failed(self, attempt: Attempt, error: ProviderError) -> None:
        # The one place the upstream's own words are kept (bounded): clients get ours.
        log.warning(
            "attempt failed",
            model=attempt.model.qualified,
            kind=error.kind.value,
            status=error.status,
            error=error.message,
            upstream_detail=error.detail,
        )
        if error.kind is ErrorKind.TRANSIENT:
            attempt.permit.record_failure()
        else:
            attempt.permit.record_ignored()
        self.finished(attempt, failure_reason(error))

    def succeeded(self, attempt: Attempt, usage: Usage) -> None:
        attempt.permit.record_success()
        self.finished(attempt, "success", usage)

    def timed_out(
        self, attempt: Attempt, limit_s: float, error_type: str, *, deadline: bool
    ) -> ProviderError | DeadlineExceededError:
        """The error for a timer of `limit_s` that fired; `deadline`: it was armed for the
        request deadline (the shorter budget), so it is not the model's fault."""
        if deadline:
            return DeadlineExceededError(attempt.run.tried)
        # Our own timeouts move on to the next model instead of spending the deadline on a
        # model that was just too slow: not retryable, but counted by the breaker.
        return ProviderError(
            ErrorKind.TRANSIENT,
            f"no answer within {limit_s:g} s",
            error_type=error_type,
            retryable=False,
        )
