"""Streaming: the commit point and the state machine after it.

Streaming has one commit point: the first content event. Before it (`open_stream`, run as an
attempt body by the attempt walk), failures — a first-token timeout included — are retried and
rerouted invisibly (and a slow first token may be hedged, see hedge.py). Time limits of a
stream: until the first token min(FIRST_TOKEN_TIMEOUT_S, ATTEMPT_TIMEOUT_S, time left); after
it, each gap between events min(STREAM_IDLE_TIMEOUT_S, time left) — a long answer that keeps
flowing is not cut by ATTEMPT_TIMEOUT_S, only by the request deadline.

`CommittedStream` is the post-commit state machine: it reads the upstream (`next_event`) and
decides how a break is settled (`_interrupt`: counted or not, which client error). A break that
a model can repair (a cut, a stall, a malformed event, a missing end) is handed to
`continuation.Continuation` by `failover.run_stream`, which finishes the answer on the same
model or the next ones of the chain without duplicating or splicing text; only when none can
does the client get the in-band error.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import structlog

from rom_agent.domain.errors import ErrorKind, ProviderError
from rom_agent.domain.events import FirstToken, StreamInterrupted
from rom_agent.domain.messages import StopEvent, StreamEvent, Usage, UsageEvent
from rom_agent.logs import get_logger
from rom_agent.resilience.attempts import Attempt, AttemptRunner
from rom_agent.resilience.errors import FIRST_TOKEN_TIMEOUT, StreamInterruptedError

log = get_logger(__name__)

FirstTokenHook = Callable[[str, float], None]


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


async def open_stream(
    runner: AttemptRunner, attempt: Attempt, on_first_token: FirstTokenHook | None = None
) -> OpenedStream:
    """Attempt body: read the upstream until its first content event, within the first-token
    timeout. `on_first_token(model, seconds)` learns the model's time to first token."""
    clock = runner.clock
    first_token_timeout_s = runner.flags.current.first_token_timeout_s
    # The deadline binds the first token when it set the attempt's budget and that budget is
    # the shorter one (ties go to the deadline: it has passed either way).
    deadline_binds = attempt.deadline_binds and attempt.budget_s <= first_token_timeout_s
    limit_s = attempt.budget_s if deadline_binds else first_token_timeout_s
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
                raise runner.timed_out(
                    attempt, limit_s, FIRST_TOKEN_TIMEOUT, deadline=deadline_binds
                ) from None
            head.append(event)
            if not isinstance(event, UsageEvent):
                runner.events.emit(FirstToken, attempt.model.id, clock.now() - attempt.started)
                if on_first_token is not None:
                    on_first_token(attempt.model.id, clock.now() - attempt.started)
                return OpenedStream(attempt, upstream, head)
    except BaseException:
        await _aclose(upstream)
        raise


# --------------------------------------------------------------------------- after the commit


class CommittedStream:
    """The stream after its commit point: reads the upstream and settles how it ends."""

    __slots__ = (
        "_head",
        "attempt",
        "broke",
        "chunks_sent",
        "runner",
        "settled",
        "stop",
        "upstream",
        "usage",
    )

    def __init__(self, runner: AttemptRunner, opened: OpenedStream) -> None:
        self.runner = runner
        self.attempt = opened.attempt
        self.upstream = opened.upstream
        self.usage = Usage()
        self.stop: StopEvent | None = None
        self.settled = False
        self.broke: StreamBreak | None = None
        self._head = opened.head
        self.chunks_sent = 0  # content events passed on to the caller

    def take_head(self) -> list[StreamEvent]:
        """The events read before the commit (the first content event last)."""
        head, self._head = self._head, []
        return head

    def accept(self, event: StreamEvent) -> tuple[StreamEvent, ...]:
        """Book-keeping of one upstream event, and what of it reaches the client now: the
        terminator is held back (`finish`) because trailing usage may still come."""
        if isinstance(event, StopEvent):
            self.stop = event
            return ()
        if isinstance(event, UsageEvent):
            self.usage += event.usage
        else:
            self.chunks_sent += 1
        return (event,)

    async def next_event(self) -> StreamEvent | None:
        """The next upstream event, or None at its end. After the terminator the answer is
        complete and a failure only ends the stream; before it, it interrupts the stream."""
        runner, attempt, stopped = self.runner, self.attempt, self.stop is not None
        idle_s = runner.flags.current.stream_idle_timeout_s
        left_s = attempt.call.deadline - runner.clock.now()
        deadline_binds = left_s <= idle_s  # decided when armed, not after it fired
        wait_s = left_s if deadline_binds else idle_s
        try:
            async with runner.timeout(wait_s):
                return await anext(self.upstream)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            if stopped:
                return None
            if deadline_binds:
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
        self.broke = how
        attempt = self.attempt
        if how.counted:
            attempt.permit.record_failure()
        else:
            attempt.permit.record_ignored()
        self.runner.finished(attempt, how.outcome)
        # One warning per broken stream: the access line alone says 200. The request id is
        # the one the HTTP layer bound to the log context.
        request_id = structlog.contextvars.get_contextvars().get("request_id")
        log.warning(
            "stream interrupted",
            request_id=request_id,
            model=attempt.model.qualified,
            cause=how.code,
            detail=message,
            chunks_sent=self.chunks_sent,
        )
        self.runner.events.emit(
            StreamInterrupted, attempt.model.id, how.code, message, self.chunks_sent, request_id
        )
        return StreamInterruptedError(
            f"Stream from {attempt.model.id} interrupted: {message}", how.code, how.status
        )

    def release(self, outcome: str) -> None:
        """Settle the attempt as neither success nor failure (cancelled, diverged)."""
        if not self.settled:
            self.settled = True
            self.attempt.permit.record_ignored()
            self.runner.finished(self.attempt, outcome)

    async def close(self) -> None:
        # Client gone (aclose / cancellation): release the permit uncounted, cancel the
        # upstream call.
        self.release("cancelled")
        await _aclose(self.upstream)
