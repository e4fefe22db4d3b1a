"""Hedged first token: when a model is slow to start answering, start the next one in parallel.

The hedge delay is learnt per model from its recent times to first token (TTFT): the p95 of
the last `WINDOW` successful first tokens × `P95_FACTOR`, bounded to [`FLOOR_S`, `CEILING_S`];
with fewer than `MIN_SAMPLES` observations the ceiling is used. `HEDGE_DELAY_S` > 0 replaces
the learnt delay. The delay measures time without a first token *within one attempt*: it starts
when the attempt's request is sent, never during a backoff or a `Retry-After` wait.

Hedges are limited per primary model by a budget shaped like the retry budget: in a sliding
10 s window, hedges may not exceed `max(3, HEDGE_BUDGET_RATIO × requests)`, so a slow provider
cannot double the upstream load (Tail at Scale: hedge only the slowest few percent).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

from rom_agent.config import Settings
from rom_agent.domain.errors import ProviderError
from rom_agent.domain.events import HedgeSettled
from rom_agent.resilience.attempts import Attempt, AttemptRunner
from rom_agent.resilience.calls import ModelCall
from rom_agent.resilience.clock import Clock, SystemClock
from rom_agent.resilience.errors import (
    AttemptFailure,
    CircuitOpenError,
    DeadlineExceededError,
    RequestRejectedError,
    UpstreamFailedError,
)
from rom_agent.resilience.fallback import ChainRun
from rom_agent.resilience.retry import RetryBudget
from rom_agent.resilience.stream import OpenedStream, open_stream

WINDOW = 200  # recent first tokens per model
MIN_SAMPLES = 20
P95_FACTOR = 1.5
FLOOR_S = 1.0
CEILING_S = 6.0
REFRESH = 20  # new samples between two p95 computations


class TtftWindow:
    """The last `WINDOW` times to first token of one model. The p95 is re-sorted only every
    `REFRESH` new samples: over 200 samples it moves slowly, and sorting on every stream was
    the hedge's largest CPU cost."""

    __slots__ = ("_fresh", "_p95", "_samples")

    def __init__(self) -> None:
        self._samples: deque[float] = deque(maxlen=WINDOW)
        self._p95 = 0.0
        self._fresh = 0  # samples added since the p95 was computed

    def add(self, seconds: float) -> None:
        self._samples.append(seconds)
        self._fresh += 1

    def __len__(self) -> int:
        return len(self._samples)

    def p95(self) -> float:
        if self._fresh >= REFRESH or (self._fresh and len(self._samples) <= MIN_SAMPLES):
            ordered = sorted(self._samples)
            self._p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
            self._fresh = 0
        return self._p95


class Hedging:
    """Per-model TTFT windows and hedge budgets; one per process, shared by all requests."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._ttft: dict[str, TtftWindow] = {}
        self._budgets: dict[str, RetryBudget] = {}

    def observe_first_token(self, model: str, seconds: float) -> None:
        window = self._ttft.get(model)
        if window is None:
            window = self._ttft[model] = TtftWindow()
        window.add(seconds)

    def delay_s(self, model: str, settings: Settings) -> float:
        """Seconds without a first token after which `model`'s attempt is hedged."""
        if settings.hedge_delay_s > 0:
            return settings.hedge_delay_s
        window = self._ttft.get(model)
        if window is None or len(window) < MIN_SAMPLES:
            return CEILING_S
        return min(CEILING_S, max(FLOOR_S, window.p95() * P95_FACTOR))

    def _budget(self, model: str) -> RetryBudget:
        budget = self._budgets.get(model)
        if budget is None:
            budget = self._budgets[model] = RetryBudget()
        return budget

    def request(self, model: str) -> None:
        """A streamed request reaches `model` first: it earns a share of hedges."""
        self._budget(model).record_request(self._clock.now())

    def try_spend(self, model: str, settings: Settings) -> bool:
        """Take one hedge from `model`'s budget; False when it is exhausted."""
        return self._budget(model).try_spend(self._clock.now(), settings.hedge_budget_ratio)


# --------------------------------------------------------------------------- the race


class _RaceDecided(BaseException):
    """Control flow out of the attempt walk once a hedge decided the race: the hedge's
    stream won, or every model failed. A BaseException so that the walk's handlers — which
    settle *their* attempt — let it through: the primary attempt is settled before raising."""

    def __init__(
        self, won: tuple[OpenedStream, int] | None, error: BaseException | None = None
    ) -> None:
        super().__init__()
        self.won = won
        self.error = error


async def open_hedged(
    runner: AttemptRunner, hedging: Hedging, call: ModelCall, run: ChainRun
) -> tuple[OpenedStream, int]:
    """The attempt walk up to a first token, with one hedge per request (see module doc)."""
    observe = hedging.observe_first_token
    settings = runner.flags.current
    if not settings.enable_hedging or len(call.chain) < 2:
        return await runner.walk(call, run, lambda attempt: open_stream(runner, attempt, observe))
    hedging.request(call.chain[0].id)
    race = _Race(runner, hedging, call, run)
    try:
        return await runner.walk(call, run, race.open)
    except _RaceDecided as decided:
        if decided.won is None:
            assert decided.error is not None
            raise decided.error from None
        return decided.won
    finally:
        if race.hedge_run is not None:
            run.attempts += race.hedge_run.attempts


class _Race:
    """The attempt body of a hedged walk. The primary attempt waits for its first token in the
    caller's task (no extra task on the common path: one timer); if the hedge delay passes
    first, the rest of the chain starts as a task, and whichever first token comes first wins —
    a winning hedge interrupts the primary's wait the way a timeout would."""

    def __init__(
        self, runner: AttemptRunner, hedging: Hedging, call: ModelCall, run: ChainRun
    ) -> None:
        self.runner = runner
        self.hedging = hedging
        self.call = call
        self.run = run
        self.hedge_run: ChainRun | None = None
        self._hedge: asyncio.Task[tuple[OpenedStream, int]] | None = None
        self._interrupt: asyncio.Timeout | None = None
        self._primary_done = False
        self._discarding: asyncio.Task[None] | None = None

    def _plain(self, attempt: Attempt) -> Awaitable[OpenedStream]:
        return open_stream(self.runner, attempt, self.hedging.observe_first_token)

    async def open(self, attempt: Attempt) -> OpenedStream:
        runner, call = self.runner, self.call
        index = list(call.chain).index(attempt.model)
        if self.hedge_run is not None or index + 1 >= len(call.chain):
            return await self._plain(attempt)
        settings = runner.flags.current
        delay_s = self.hedging.delay_s(attempt.model.id, settings)
        if delay_s >= min(settings.first_token_timeout_s, attempt.budget_s):
            return await self._plain(attempt)  # the first-token timeout comes first anyway
        self._primary_done = False
        # Time without a first token *within this attempt*: backoff and Retry-After waits
        # happen between attempts, never inside this window.
        timer = _call_later(
            runner.clock,
            attempt.started + delay_s - runner.clock.now(),
            lambda: self._start_hedge(attempt, index),
        )
        try:
            try:
                async with asyncio.timeout(None) as interrupt:
                    self._interrupt = interrupt
                    opened = await self._plain(attempt)
                    self._primary_done = True
            except TimeoutError:  # interrupted: the hedge won
                self._primary_done = True
                attempt.permit.record_ignored()  # cancelled: neither success nor failure
                runner.finished(attempt, "cancelled")
                raise self._hedge_won(attempt, index) from None
            except (ProviderError, DeadlineExceededError) as error:
                self._primary_done = True
                if self._hedge is None:
                    raise  # no hedge running: the walk settles and retries as usual
                self._settle_failed(attempt, error)
                raise await self._hedge_alone(attempt, index, error) from None
        finally:
            self._interrupt = None
            timer.cancel()
            if not self._primary_done:  # cancelled (the client left): the hedge goes too
                self._abandon_hedge()
        if self._hedge is not None:
            await self._cancel_hedge()
            runner.events.emit(HedgeSettled, attempt.model.id, "primary_won")
        return opened

    def _start_hedge(self, attempt: Attempt, index: int) -> None:
        """Timer callback at the hedge delay: start the rest of the chain, budget allowing."""
        if self._primary_done:
            return
        runner, call, settings = self.runner, self.call, self.runner.flags.current
        model = attempt.model.id
        if not self.hedging.try_spend(call.chain[0].id, settings):
            runner.events.emit(HedgeSettled, model, "budget_exhausted")
            return
        runner.events.emit(HedgeSettled, model, "started")
        rest = dataclasses.replace(call, chain=tuple(call.chain[index + 1 :]))
        self.hedge_run = ChainRun(rest.chain, runner.events)
        hedge = asyncio.get_running_loop().create_task(
            runner.walk(rest, self.hedge_run, self._plain)
        )
        hedge.add_done_callback(self._hedge_finished)
        self._hedge = hedge

    def _hedge_finished(self, hedge: asyncio.Task[tuple[OpenedStream, int]]) -> None:
        if hedge.cancelled() or hedge.exception() is not None:
            return  # a failed hedge: the primary carries on alone
        if not self._primary_done and self._interrupt is not None:
            self._interrupt.reschedule(asyncio.get_running_loop().time())

    def _hedge_won(self, attempt: Attempt, index: int) -> _RaceDecided:
        assert self._hedge is not None and self._hedge.done()
        opened, position = self._hedge.result()
        self.runner.events.emit(HedgeSettled, attempt.model.id, "hedge_won")
        return _RaceDecided((opened, index + 1 + position))

    async def _hedge_alone(
        self, attempt: Attempt, index: int, primary_error: BaseException
    ) -> _RaceDecided:
        """The primary failed while the hedge runs: the answer is the hedge's."""
        assert self._hedge is not None
        try:
            opened, position = await self._hedge
        except asyncio.CancelledError:
            raise
        except BaseException as hedge_error:
            return _RaceDecided(None, self._final_error(primary_error, hedge_error))
        self.runner.events.emit(HedgeSettled, attempt.model.id, "hedge_won")
        return _RaceDecided((opened, index + 1 + position))

    async def _cancel_hedge(self) -> None:
        """The primary won: the hedge is cancelled (its attempt ignored by its breaker) or,
        if it also produced a first token meanwhile, its stream is closed unused."""
        hedge = self._hedge
        assert hedge is not None
        if not hedge.done():
            hedge.cancel()
            with contextlib.suppress(BaseException):
                await hedge
            return
        if not hedge.cancelled() and hedge.exception() is None:
            await _discard(self.runner, hedge.result()[0])

    def _abandon_hedge(self) -> None:
        hedge = self._hedge
        if hedge is None:
            return
        if not hedge.done():
            hedge.cancel()  # its attempt is released as cancelled by the walk
        elif not hedge.cancelled() and hedge.exception() is None:
            opened = hedge.result()[0]
            self._discarding = asyncio.get_running_loop().create_task(_discard(self.runner, opened))

    def _settle_failed(self, attempt: Attempt, error: BaseException) -> None:
        """The primary failed after the hedge started: settle it as the walk would have."""
        if isinstance(error, ProviderError):
            self.runner.failed(attempt, error)
            self.run.tried.append(AttemptFailure.from_error(attempt.model.id, error, 1))
        else:
            attempt.permit.record_ignored()
            self.runner.finished(attempt, "timeout")

    def _final_error(self, primary: BaseException, hedge: BaseException) -> BaseException:
        """Both sides failed: the whole chain was tried."""
        for error in (hedge, primary):
            if isinstance(error, DeadlineExceededError | RequestRejectedError):
                return error
        assert self.hedge_run is not None
        if isinstance(hedge, CircuitOpenError) and not self.run.tried:
            return hedge
        return UpstreamFailedError([*self.run.tried, *self.hedge_run.tried])


class _Timer(Protocol):
    def cancel(self) -> object: ...


def _call_later(clock: Clock, delay_s: float, callback: Callable[[], None]) -> _Timer:
    """`callback` after `delay_s` on `clock`: a loop timer for the system clock, a task
    sleeping on any other clock (a FakeClock in tests)."""
    loop = asyncio.get_running_loop()
    if isinstance(clock, SystemClock):
        return loop.call_later(max(0.0, delay_s), callback)

    async def later() -> None:
        await clock.sleep(max(0.0, delay_s))
        callback()

    return loop.create_task(later())


async def _discard(runner: AttemptRunner, opened: OpenedStream) -> None:
    """A stream that won too late: close it, its attempt neither a success nor a failure."""
    opened.attempt.permit.record_ignored()
    runner.finished(opened.attempt, "cancelled")
    aclose = getattr(opened.upstream, "aclose", None)
    if aclose is not None:
        await aclose()
