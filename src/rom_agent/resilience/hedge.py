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
from collections.abc import Awaitable
from typing import Any

from rom_agent.config import Settings
from rom_agent.domain.errors import ProviderError
from rom_agent.domain.events import HedgeSettled
from rom_agent.resilience.attempts import Attempt, AttemptRunner
from rom_agent.resilience.calls import ModelCall
from rom_agent.resilience.clock import Clock
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


class TtftWindow:
    """The last `WINDOW` times to first token of one model. The p95 is recomputed only after
    new samples (sorting 200 floats is a few microseconds, once per hedge decision at most)."""

    __slots__ = ("_p95", "_samples")

    def __init__(self) -> None:
        self._samples: deque[float] = deque(maxlen=WINDOW)
        self._p95: float | None = None

    def add(self, seconds: float) -> None:
        self._samples.append(seconds)
        self._p95 = None

    def __len__(self) -> int:
        return len(self._samples)

    def p95(self) -> float:
        if self._p95 is None:
            ordered = sorted(self._samples)
            self._p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
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
    """The attempt body of a hedged walk: the first attempt that waits too long for its first
    token starts the rest of the chain in parallel; the first first token wins."""

    def __init__(
        self, runner: AttemptRunner, hedging: Hedging, call: ModelCall, run: ChainRun
    ) -> None:
        self.runner = runner
        self.hedging = hedging
        self.call = call
        self.run = run
        self.hedge_run: ChainRun | None = None

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
        primary = asyncio.ensure_future(self._plain(attempt))
        hedge: asyncio.Future[tuple[OpenedStream, int]] | None = None
        try:
            try:
                # Time without a first token *within this attempt*: backoff and Retry-After
                # waits happen between attempts, never inside this window.
                async with runner.timeout(attempt.started + delay_s - runner.clock.now()):
                    return await asyncio.shield(primary)
            except TimeoutError:
                if primary.done():
                    return primary.result()
            model = attempt.model.id
            if not self.hedging.try_spend(call.chain[0].id, settings):
                runner.events.emit(HedgeSettled(model, "budget_exhausted"))
                return await primary
            runner.events.emit(HedgeSettled(model, "started"))
            rest = dataclasses.replace(call, chain=tuple(call.chain[index + 1 :]))
            self.hedge_run = ChainRun(rest.chain, runner.events)
            hedge = asyncio.ensure_future(runner.walk(rest, self.hedge_run, self._plain))
            return await self._decide(attempt, index, primary, hedge)
        finally:
            for task in (primary, hedge):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task

    async def _decide(
        self,
        attempt: Attempt,
        index: int,
        primary: asyncio.Future[OpenedStream],
        hedge: asyncio.Future[tuple[OpenedStream, int]],
    ) -> OpenedStream:
        runner, model = self.runner, attempt.model.id
        primary_error: BaseException | None = None
        hedge_error: BaseException | None = None
        pending: set[asyncio.Future[Any]] = {primary, hedge}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if primary in done:
                primary_error = primary.exception()
                if primary_error is None:
                    if hedge in done and hedge.exception() is None:
                        await _discard(runner, hedge.result()[0])
                    runner.events.emit(HedgeSettled(model, "primary_won"))
                    return primary.result()  # the hedge is cancelled by `open`
                self._settle_failed(attempt, primary_error)
            if hedge in done:
                hedge_error = hedge.exception()
                if hedge_error is None:
                    opened, position = hedge.result()
                    if primary_error is None:  # still waiting: cancelled, ignored by its breaker
                        primary.cancel()
                        with contextlib.suppress(BaseException):
                            await primary
                        attempt.permit.record_ignored()
                        runner.finished(attempt, "cancelled")
                    runner.events.emit(HedgeSettled(model, "hedge_won"))
                    raise _RaceDecided((opened, index + 1 + position))
        raise _RaceDecided(None, self._final_error(attempt, primary_error, hedge_error))

    def _settle_failed(self, attempt: Attempt, error: BaseException) -> None:
        """The primary failed after the hedge started: settle it as the walk would have."""
        if isinstance(error, ProviderError):
            self.runner.failed(attempt, error)
            self.run.tried.append(AttemptFailure.from_error(attempt.model.id, error, 1))
        else:
            attempt.permit.record_ignored()
            self.runner.finished(attempt, "timeout")

    def _final_error(
        self, attempt: Attempt, primary: BaseException | None, hedge: BaseException | None
    ) -> BaseException:
        """Both sides failed: the whole chain was tried."""
        for error in (hedge, primary):
            if isinstance(error, DeadlineExceededError | RequestRejectedError):
                return error
        assert self.hedge_run is not None
        tried = [*self.run.tried, *self.hedge_run.tried]
        if isinstance(hedge, CircuitOpenError) and not self.run.tried:
            return hedge
        return UpstreamFailedError(tried)


async def _discard(runner: AttemptRunner, opened: OpenedStream) -> None:
    """A stream that won too late: close it, its attempt neither a success nor a failure."""
    opened.attempt.permit.record_ignored()
    runner.finished(opened.attempt, "cancelled")
    aclose = getattr(opened.upstream, "aclose", None)
    if aclose is not None:
        await aclose()
