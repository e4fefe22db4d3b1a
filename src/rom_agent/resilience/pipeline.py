"""The resilience pipeline: every protection around one model turn, in SPEC order.

    fallback chain over models
      → per model: retry (with budget)
          → circuit breaker (every attempt holds a permit)
              → attempt timeout: min(ATTEMPT_TIMEOUT_S, time left to the request deadline)
                  → fault plan (drills only) → provider

One deadline (`ModelCall.deadline`, absolute clock time) covers every retry and fallback; once
it has passed no further attempt is made (`DeadlineExceededError`). A timeout caused by the
deadline rather than by ATTEMPT_TIMEOUT_S is not the model's fault and is not counted.

Streaming has one commit point: the first content event. Before it, failures — a first-token
timeout included — are retried and rerouted invisibly. `stream()` then yields `StreamStart`
followed by the winning upstream's events; after the commit nothing is retried: a stall, an
upstream error or a missing terminator raises `StreamInterruptedError`. Time limits of a
stream: until the first token min(FIRST_TOKEN_TIMEOUT_S, ATTEMPT_TIMEOUT_S, time left); after
it, each gap between events min(STREAM_IDLE_TIMEOUT_S, time left) — a long answer that keeps
flowing is not cut by ATTEMPT_TIMEOUT_S, only by the request deadline.

Timeouts: production uses `asyncio.timeout` (one timer handle, no task). Any other clock (a
`FakeClock` in tests) gets the same `asyncio.Timeout` machinery fired by a watcher task that
sleeps on that clock, so virtual time drives timeouts exactly as real time does.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

from rom_agent.config import Settings
from rom_agent.domain.options import NO_OPTIONS, GenerationOptions
from rom_agent.flags import FlagStore
from rom_agent.logs import get_logger
from rom_agent.metrics import Metrics
from rom_agent.providers.base import (
    ChatRequest,
    ChatResponse,
    ErrorKind,
    Message,
    ModelRef,
    Provider,
    ProviderError,
    StopEvent,
    StreamEvent,
    ToolSpec,
    Usage,
    UsageEvent,
)
from rom_agent.resilience.breaker import AnyPermit, BreakerOpen, BreakerRegistry
from rom_agent.resilience.clock import Clock, SystemClock
from rom_agent.resilience.errors import (
    ATTEMPT_TIMEOUT,
    CIRCUIT_OPEN,
    FIRST_TOKEN_TIMEOUT,
    MODEL_ERROR,
    AttemptFailure,
    DeadlineExceededError,
    RequestRejectedError,
    StreamInterruptedError,
    failure_reason,
)
from rom_agent.resilience.fallback import ChainRun, build_chain
from rom_agent.resilience.faults import FaultPlan
from rom_agent.resilience.retry import Retry

log = get_logger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Break:
    """One way a committed stream can break."""

    code: str
    status: int
    counted: bool  # a breaker failure of the model (else released uncounted)
    outcome: str  # llm_request_duration_seconds{outcome}


_CUT = _Break("STREAM_INTERRUPTED", 502, True, "error")
_REFUSED = _Break("STREAM_INTERRUPTED", 502, False, "error")  # MODEL/REQUEST error mid-stream
_FILTERED = _Break("CONTENT_FILTERED", 400, False, "error")  # content-policy stop mid-answer
_STALL = _Break("STREAM_IDLE_TIMEOUT", 504, True, "timeout")
_DEADLINE = _Break("TIMEOUT", 504, False, "timeout")

# --------------------------------------------------------------------------- timeouts

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
        return await self._timeout.__aexit__(exc_type, exc, tb)


def clock_timeouts(clock: Clock) -> TimeoutFactory:
    """The timeout factory matching `clock`: the event loop's own timers for the system
    clock (whose sleep *is* asyncio.sleep), a clock-driven watcher for anything else."""
    if isinstance(clock, SystemClock):
        return asyncio.timeout
    return functools.partial(_ClockTimeout, clock)


# --------------------------------------------------------------------------- call and result


@dataclass(frozen=True, slots=True)
class ModelCall:
    """One model turn, as the agent loop asks for it."""

    messages: Sequence[Message]
    chain: Sequence[ModelRef]
    deadline: float  # absolute, on the pipeline's clock (see Pipeline.new_deadline)
    system: str | None = None
    tools: Sequence[ToolSpec] = ()
    fault: FaultPlan | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    options: GenerationOptions = NO_OPTIONS
    hints: dict[str, Any] = field(default_factory=dict)  # passed to ChatRequest.hints as is


@dataclass(frozen=True, slots=True)
class PipelineResult:
    response: ChatResponse
    model: ModelRef  # the model that answered
    fallback_used: bool  # it is not the chain's first
    attempts: int  # provider calls made, retries included
    tried: list[AttemptFailure]  # why each earlier model did not answer


@dataclass(frozen=True, slots=True)
class StreamStart:
    """First item of a committed stream, right before its first content event."""

    model: ModelRef
    fallback_used: bool
    attempts: int


StreamItem = StreamStart | StreamEvent

# --------------------------------------------------------------------------- internals


@dataclass(slots=True)
class _Attempt:
    """One provider attempt: everything the attempt bodies need."""

    call: ModelCall
    run: ChainRun
    model: ModelRef
    provider: Provider
    permit: AnyPermit
    request: ChatRequest
    fault: FaultPlan | None
    started: float
    budget_s: float  # min(ATTEMPT_TIMEOUT_S, time left)


@dataclass(slots=True)
class _Opened:
    """A stream that produced its first content event (the commit point)."""

    attempt: _Attempt
    upstream: AsyncIterator[StreamEvent]
    head: list[StreamEvent]


class _LeaveModel(Exception):
    """Control flow: leave this model for the next one of the chain."""

    def __init__(self, failure: AttemptFailure, retry_after_s: float | None = None) -> None:
        self.failure = failure
        self.retry_after_s = retry_after_s


async def _aclose(upstream: AsyncIterator[StreamEvent]) -> None:
    aclose = getattr(upstream, "aclose", None)
    if aclose is not None:
        await aclose()


# --------------------------------------------------------------------------- pipeline


class Pipeline:
    """Runs model turns through every protection. One per process; all state lives in the
    breaker registry and the retry budgets, so concurrent requests share them."""

    def __init__(
        self,
        flags: FlagStore,
        providers: Mapping[str, Provider],
        breakers: BreakerRegistry,
        metrics: Metrics,
        clock: Clock,
        *,
        retry: Retry | None = None,
        timeout: TimeoutFactory | None = None,
    ) -> None:
        self._flags = flags
        self._providers = providers
        self._breakers = breakers
        self._metrics = metrics
        self._clock = clock
        self._retry = retry if retry is not None else Retry(flags, clock, metrics)
        self._timeout = timeout if timeout is not None else clock_timeouts(clock)
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

    # ------------------------------------------------------------------ non-streaming

    async def complete(self, call: ModelCall) -> PipelineResult:
        run = ChainRun(call.chain, self._metrics)
        response, index = await self._walk(call, run, self._complete_once)
        return PipelineResult(response, call.chain[index], index > 0, run.attempts, run.tried)

    async def _complete_once(self, attempt: _Attempt) -> ChatResponse:
        try:
            async with self._timeout(attempt.budget_s):
                if attempt.fault is not None:
                    response = await attempt.fault.complete(
                        attempt.provider, attempt.request, self._clock
                    )
                else:
                    response = await attempt.provider.complete(attempt.request)
        except TimeoutError:
            raise self._timed_out(attempt, attempt.budget_s, ATTEMPT_TIMEOUT) from None
        attempt.permit.record_success()
        self._succeeded(attempt, response.usage)
        return response

    # ------------------------------------------------------------------ streaming

    async def stream(self, call: ModelCall) -> AsyncIterator[StreamItem]:
        """`StreamStart`, then the winning upstream's events: content, `UsageEvent`s, and
        `StopEvent` always last. Ends cleanly only after the upstream's terminator; otherwise
        raises `StreamInterruptedError`. Before `StreamStart` it may raise any pipeline
        error (`CircuitOpenError`, `UpstreamFailedError`, ...), exactly like `complete()`."""
        run = ChainRun(call.chain, self._metrics)
        opened, index = await self._walk(call, run, self._open_stream)
        attempt, upstream = opened.attempt, opened.upstream
        settled = False
        try:
            yield StreamStart(attempt.model, index > 0, run.attempts)
            usage = Usage()
            stop: StopEvent | None = None
            batch: Iterable[StreamEvent] | None = opened.head
            while batch is not None:
                for event in batch:
                    if isinstance(event, StopEvent):
                        stop = event  # held back: trailing usage may still come
                        continue
                    if isinstance(event, UsageEvent):
                        usage += event.usage
                    yield event
                following = await self._next_after_commit(attempt, upstream, stop is not None)
                batch = None if following is None else (following,)
            if stop is None:
                raise self._interrupted(attempt, "the stream ended without a terminator", _CUT)
            settled = True
            attempt.permit.record_success()
            self._succeeded(attempt, usage)
            yield stop
        except StreamInterruptedError:
            settled = True  # recorded by _interrupted
            raise
        finally:
            # Client gone (aclose / cancellation): release the permit uncounted, cancel the
            # upstream call.
            if not settled:
                attempt.permit.record_ignored()
                self._metrics.llm_attempt(
                    attempt.model.id, "cancelled", self._clock.now() - attempt.started
                )
            await _aclose(upstream)

    async def _open_stream(self, attempt: _Attempt) -> _Opened:
        """Read the upstream until its first content event, within the first-token timeout."""
        limit_s = min(self._flags.current.first_token_timeout_s, attempt.budget_s)
        first_token_by = attempt.started + limit_s
        if attempt.fault is not None:
            upstream = attempt.fault.stream(attempt.provider, attempt.request, self._clock)
        else:
            upstream = attempt.provider.stream(attempt.request)
        head: list[StreamEvent] = []
        try:
            while True:
                try:
                    async with self._timeout(first_token_by - self._clock.now()):
                        event = await anext(upstream)
                except StopAsyncIteration:
                    raise ProviderError(
                        ErrorKind.TRANSIENT,
                        "the upstream stream ended before the first token",
                        error_type="StreamCut",
                    ) from None
                except TimeoutError:
                    raise self._timed_out(attempt, limit_s, FIRST_TOKEN_TIMEOUT) from None
                head.append(event)
                if not isinstance(event, UsageEvent):
                    return _Opened(attempt, upstream, head)
        except BaseException:
            await _aclose(upstream)
            raise

    async def _next_after_commit(
        self, attempt: _Attempt, upstream: AsyncIterator[StreamEvent], stopped: bool
    ) -> StreamEvent | None:
        """The next upstream event, or None at its end. After the terminator the answer is
        complete and a failure only ends the stream; before it, it interrupts the stream."""
        settings = self._flags.current
        wait_s = min(settings.stream_idle_timeout_s, attempt.call.deadline - self._clock.now())
        try:
            async with self._timeout(wait_s):
                return await anext(upstream)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            if stopped:
                return None
            if wait_s < settings.stream_idle_timeout_s:
                raise self._interrupted(attempt, "request deadline exceeded", _DEADLINE) from None
            raise self._interrupted(attempt, f"no data for {wait_s:g} s", _STALL) from None
        except ProviderError as error:
            if stopped:
                return None
            how = (
                _CUT
                if error.kind is ErrorKind.TRANSIENT
                else _FILTERED
                if error.kind is ErrorKind.POLICY
                else _REFUSED
            )
            raise self._interrupted(attempt, f"upstream error: {error.message}", how) from error
        except Exception as exc:
            if stopped:
                return None
            log.exception("unclassified provider error mid-stream", model=attempt.model.qualified)
            message = f"unexpected {type(exc).__name__}"
            raise self._interrupted(attempt, message, _CUT) from exc

    def _interrupted(self, attempt: _Attempt, message: str, how: _Break) -> StreamInterruptedError:
        if how.counted:
            attempt.permit.record_failure()
        else:
            attempt.permit.record_ignored()
        elapsed = self._clock.now() - attempt.started
        self._metrics.llm_attempt(attempt.model.id, how.outcome, elapsed)
        return StreamInterruptedError(
            f"Stream from {attempt.model.id} interrupted: {message}", how.code, how.status
        )

    # ------------------------------------------------------------------ the walk

    async def _walk(
        self, call: ModelCall, run: ChainRun, once: Callable[[_Attempt], Awaitable[T]]
    ) -> tuple[T, int]:
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

    async def _try_model(
        self,
        call: ModelCall,
        run: ChainRun,
        index: int,
        model: ModelRef,
        once: Callable[[_Attempt], Awaitable[T]],
    ) -> T:
        """Retry loop of one model."""
        provider = self._providers.get(model.provider)
        if provider is None:
            message = f"provider {model.provider!r} is not configured"
            failure = AttemptFailure(model.id, MODEL_ERROR, ErrorKind.MODEL.value, None, message)
            raise _LeaveModel(failure)
        settings = self._flags.current
        calls = 0
        last_error: ProviderError | None = None
        while True:
            if self._clock.now() >= call.deadline:
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
                settings = self._flags.current
                if error.kind is ErrorKind.REQUEST or (
                    error.kind is ErrorKind.POLICY and not settings.content_policy_fallback
                ):
                    raise RequestRejectedError(model.id, error) from error
                delay = self._retry.delay_before_retry(
                    model.id, error, calls - 1, call.deadline, settings
                )
                if delay is None:
                    raise _LeaveModel(AttemptFailure.from_error(model.id, error, calls)) from error
                last_error = error
            await self._clock.sleep(delay)

    async def _attempt(
        self,
        call: ModelCall,
        run: ChainRun,
        model: ModelRef,
        provider: Provider,
        permit: AnyPermit,
        settings: Settings,
        once: Callable[[_Attempt], Awaitable[T]],
    ) -> T:
        """One provider attempt under a breaker permit. The body records success itself (a
        stream only knows at its end); every other outcome is settled here."""
        started = self._clock.now()
        budget_s = min(settings.attempt_timeout_s, call.deadline - started)
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
        attempt = _Attempt(call, run, model, provider, permit, request, fault, started, budget_s)
        try:
            return await once(attempt)
        except ProviderError as error:
            self._failed(attempt, error)
            raise
        except DeadlineExceededError:
            permit.record_ignored()
            self._metrics.llm_attempt(model.id, "timeout", self._clock.now() - started)
            raise
        except asyncio.CancelledError:
            permit.record_ignored()
            self._metrics.llm_attempt(model.id, "cancelled", self._clock.now() - started)
            raise
        except Exception as exc:
            # A provider broke its contract (errors must be ProviderError). Treat it as an
            # upstream failure so the breaker and the fallback still protect the request.
            log.exception("unclassified provider error", model=model.qualified)
            error = ProviderError(
                ErrorKind.TRANSIENT,
                f"unexpected {type(exc).__name__} from provider {model.provider}",
                error_type=type(exc).__name__,
                retryable=False,
            )
            self._failed(attempt, error)
            raise error from exc

    # ------------------------------------------------------------------ outcomes

    def _failed(self, attempt: _Attempt, error: ProviderError) -> None:
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
        self._metrics.llm_attempt(
            attempt.model.id, failure_reason(error), self._clock.now() - attempt.started
        )

    def _succeeded(self, attempt: _Attempt, usage: Usage) -> None:
        model = attempt.model.id
        self._metrics.llm_attempt(model, "success", self._clock.now() - attempt.started)
        self._metrics.tokens_used(model, usage.input_tokens, usage.output_tokens)

    def _timed_out(
        self, attempt: _Attempt, limit_s: float, error_type: str
    ) -> ProviderError | DeadlineExceededError:
        if self._clock.now() >= attempt.call.deadline:
            return DeadlineExceededError(attempt.run.tried)
        # Our own timeouts move on to the next model instead of spending the deadline on a
        # model that was just too slow: not retryable, but counted by the breaker.
        return ProviderError(
            ErrorKind.TRANSIENT,
            f"no answer within {limit_s:g} s",
            error_type=error_type,
            retryable=False,
        )
