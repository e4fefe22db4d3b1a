"""Streaming: the commit point and the state machine after it.

Streaming has one commit point: the first content event. Before it (`open_stream`, run as an
attempt body by the attempt walk), failures — a first-token timeout included — are retried and
rerouted invisibly. `run_stream` then yields `StreamStart` followed by the winning upstream's
events; after the commit nothing is retried: a stall, an upstream error or a missing terminator
raises `StreamInterruptedError`. Time limits of a stream: until the first token
min(FIRST_TOKEN_TIMEOUT_S, ATTEMPT_TIMEOUT_S, time left); after it, each gap between events
min(STREAM_IDLE_TIMEOUT_S, time left) — a long answer that keeps flowing is not cut by
ATTEMPT_TIMEOUT_S, only by the request deadline.

`CommittedStream` is the post-commit state machine: it reads the upstream (`_next`), decides
how a break is settled (`_interrupt`: counted or not, which client error), and is where
continuation on another model or hedging hook in.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from rom_agent.domain.errors import ErrorKind, ProviderError
from rom_agent.domain.events import FirstToken
from rom_agent.domain.messages import StopEvent, StreamEvent, Usage, UsageEvent
from rom_agent.logs import get_logger
from rom_agent.resilience.attempts import Attempt, AttemptRunner
from rom_agent.resilience.calls import ModelCall, StreamItem, StreamStart
from rom_agent.resilience.errors import FIRST_TOKEN_TIMEOUT, StreamInterruptedError
from rom_agent.resilience.fallback import ChainRun

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class StreamBreak:
    """One way a committed stream can break."""

    code: str
    status: int
    counted: bool  # a breaker failure of the model (else released uncounted)
    outcome: str  # llm_request_duration_seconds{outcome}


CUT = StreamBreak("STREAM_INTERRUPTED", 502, True, "error")
REFUSED = StreamBreak("STREAM_INTERRUPTED", 502, False, "error")  # MODEL/REQUEST error mid-stream
FILTERED = StreamBreak("CONTENT_FILTERED", 400, False, "error")  # content-policy stop mid-answer
STALL = StreamBreak("STREAM_IDLE_TIMEOUT", 504, True, "timeout")
DEADLINE = StreamBreak("TIMEOUT", 504, False, "timeout")


async def _aclose(upstream: AsyncIterator[StreamEvent]) -> None:
    aclose = getattr(upstream, "aclose", None)
    if aclose is not None:
        await aclose()


# --------------------------------------------------------------------------- before the commit


@dataclass(slots=True)
class OpenedStream:
    """A stream that produced its first content event (the commit point)."""

    attempt: Attempt
    upstream: AsyncIterator[StreamEvent]
    head: list[StreamEvent]


async def open_stream(runner: AttemptRunner, attempt: Attempt) -> OpenedStream:
    """Attempt body: read the upstream until its first content event, within the first-token
    timeout."""
    clock = runner.clock
    limit_s = min(runner.flags.current.first_token_timeout_s, attempt.budget_s)
    first_token_by = attempt.started + limit_s
    if attempt.fault is not None:
        upstream = attempt.fault.stream(attempt.provider, attempt.request, clock)
    else:
        upstream = attempt.provider.stream(attempt.request)
    head: list[StreamEvent] = []
    try:
        while True:
            try:
                async with runner.timeout(first_token_by - clock.now()):
                    event = await anext(upstream)
            except StopAsyncIteration:
                raise ProviderError(
                    ErrorKind.TRANSIENT,
                    "the upstream stream ended before the first token",
                    error_type="StreamCut",
                ) from None
            except TimeoutError:
                raise runner.timed_out(attempt, limit_s, FIRST_TOKEN_TIMEOUT) from None
            head.append(event)
            if not isinstance(event, UsageEvent):
                runner.events.emit(FirstToken, attempt.model.id, clock.now() - attempt.started)
                return OpenedStream(attempt, upstream, head)
    except BaseException:
        await _aclose(upstream)
        raise


# --------------------------------------------------------------------------- after the commit


async def run_stream(runner: AttemptRunner, call: ModelCall) -> AsyncIterator[StreamItem]:
    """`StreamStart`, then the winning upstream's events (see `Pipeline.stream`)."""
    run = ChainRun(call.chain, runner.events)

    async def once(attempt: Attempt) -> OpenedStream:
        return await open_stream(runner, attempt)

    opened, index = await runner.walk(call, run, once)
    committed = CommittedStream(runner, opened)
    try:
        yield StreamStart(opened.attempt.model, index > 0, run.attempts)
        batch: Iterable[StreamEvent] | None = opened.head
        while batch is not None:
            for event in batch:
                if isinstance(event, StopEvent):
                    committed.stop = event  # held back: trailing usage may still come
                    continue
                if isinstance(event, UsageEvent):
                    committed.usage += event.usage
                yield event
            following = await committed.next_event()
            batch = None if following is None else (following,)
        yield committed.finish()
    finally:
        await committed.close()


class CommittedStream:
    """The stream after its commit point: reads the upstream and settles how it ends."""

    __slots__ = ("attempt", "runner", "settled", "stop", "upstream", "usage")

    def __init__(self, runner: AttemptRunner, opened: OpenedStream) -> None:
        self.runner = runner
        self.attempt = opened.attempt
        self.upstream = opened.upstream
        self.usage = Usage()
        self.stop: StopEvent | None = None
        self.settled = False

    async def next_event(self) -> StreamEvent | None:
        """The next upstream event, or None at its end. After the terminator the answer is
        complete and a failure only ends the stream; before it, it interrupts the stream."""
        runner, attempt, stopped = self.runner, self.attempt, self.stop is not None
        settings = runner.flags.current
        wait_s = min(settings.stream_idle_timeout_s, attempt.call.deadline - runner.clock.now())
        try:
            async with runner.timeout(wait_s):
                return await anext(self.upstream)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            if stopped:
                return None
            if wait_s < settings.stream_idle_timeout_s:
                raise self._interrupt("request deadline exceeded", DEADLINE) from None
            raise self._interrupt(f"no data for {wait_s:g} s", STALL) from None
        except ProviderError as error:
            if stopped:
                return None
            how = (
                CUT
                if error.kind is ErrorKind.TRANSIENT
                else FILTERED
                if error.kind is ErrorKind.POLICY
                else REFUSED
            )
            raise self._interrupt(f"upstream error: {error.message}", how) from error
        except Exception as exc:
            if stopped:
                return None
            log.exception("unclassified provider error mid-stream", model=attempt.model.qualified)
            raise self._interrupt(f"unexpected {type(exc).__name__}", CUT) from exc

    def finish(self) -> StopEvent:
        """The upstream ended: its terminator, or an interruption if it sent none."""
        if self.stop is None:
            raise self._interrupt("the stream ended without a terminator", CUT)
        self.settled = True
        self.runner.succeeded(self.attempt, self.usage)
        return self.stop

    def _interrupt(self, message: str, how: StreamBreak) -> StreamInterruptedError:
        self.settled = True
        attempt = self.attempt
        if how.counted:
            attempt.permit.record_failure()
        else:
            attempt.permit.record_ignored()
        self.runner.finished(attempt, how.outcome)
        return StreamInterruptedError(
            f"Stream from {attempt.model.id} interrupted: {message}", how.code, how.status
        )

    async def close(self) -> None:
        # Client gone (aclose / cancellation): release the permit uncounted, cancel the
        # upstream call.
        if not self.settled:
            self.settled = True
            self.attempt.permit.record_ignored()
            self.runner.finished(self.attempt, "cancelled")
        await _aclose(self.upstream)
