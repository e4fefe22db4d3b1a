"""Retry (SPEC §2, §4): full-jitter exponential backoff, Retry-After, deadline, retry budget.

The pipeline owns the loop; this module owns every decision in it: whether a failed attempt
of a model is retried, after how long, and the budget that keeps retries from multiplying load
on an upstream that is already failing.

* Only `ProviderError.retryable` errors are retried: throttling, 5xx, connection errors.
  MODEL and REQUEST errors, injected FORCE_ERROR faults and our own timeouts are not (a timed-out
  model is left for the next one rather than given another ATTEMPT_TIMEOUT_S).
* Delay of retry n (0-based): `random() * min(RETRY_MAX_DELAY, RETRY_BASE_DELAY * 2**n)` — AWS's
  "full jitter" — drawn from the injected clock's random source.
* A `Retry-After` hint makes the wait `max(backoff, hint)`; a wait that would end past the
  request deadline is not made: the model is left for the next one instead.
* Retry budget, per model and process: in a sliding 10 s window (ten 1 s buckets on the
  injected clock) retries may not exceed `max(3, floor(RETRY_BUDGET_RATIO × requests))`, where a
  request is one request reaching this model. The floor of 3 keeps retries working at low
  traffic; the ratio caps amplification at 1 + ratio under sustained failure (Envoy, Finagle,
  SRE book). A refused retry is counted (`retry_budget_exhausted_total`) and the chain moves on.
"""

from __future__ import annotations

import math

from rom_agent.config import Settings
from rom_agent.domain.errors import ProviderError
from rom_agent.domain.events import Events, RetryBudgetExhausted, RetryScheduled
from rom_agent.flags import FlagStore
from rom_agent.resilience.clock import Clock
from rom_agent.resilience.errors import failure_reason

BUCKET_S = 1.0
WINDOW_BUCKETS = 10  # window = 10 s
MIN_RETRIES_PER_WINDOW = 3


class RetryBudget:
    """Requests and retries of one model over a sliding window of fixed buckets."""

    __slots__ = ("_epochs", "_requests", "_retries")

    def __init__(self) -> None:
        self._epochs = [-1] * WINDOW_BUCKETS
        self._requests = [0] * WINDOW_BUCKETS
        self._retries = [0] * WINDOW_BUCKETS

    def _slot(self, now: float) -> int:
        epoch = int(now // BUCKET_S)
        slot = epoch % WINDOW_BUCKETS
        if self._epochs[slot] != epoch:  # the bucket last held an older second: recycle it
            self._epochs[slot] = epoch
            self._requests[slot] = 0
            self._retries[slot] = 0
        return slot

    def record_request(self, now: float) -> None:
        self._requests[self._slot(now)] += 1

    def window(self, now: float) -> tuple[int, int]:
        """(requests, retries) in the window ending now."""
        slot = self._slot(now)
        oldest = self._epochs[slot] - WINDOW_BUCKETS + 1
        requests = retries = 0
        for epoch, req, ret in zip(self._epochs, self._requests, self._retries, strict=True):
            if epoch >= oldest:
                requests += req
                retries += ret
        return requests, retries

    def try_spend(self, now: float, ratio: float) -> bool:
        requests, retries = self.window(now)
        # At most floor(ratio × requests): 16 requests × 0.2 allow 3 retries, not 4.
        if retries >= max(MIN_RETRIES_PER_WINDOW, math.floor(ratio * requests)):
            return False
        self._retries[self._slot(now)] += 1
        return True


def backoff_s(retry_index: int, settings: Settings, random: float) -> float:
    """Full-jitter delay before retry `retry_index` (0 = the first retry), in seconds."""
    growth: int = 2**retry_index
    cap = min(settings.retry_max_delay_ms, settings.retry_base_delay_ms * growth)
    return random * cap / 1000.0


class Retry:
    def __init__(self, flags: FlagStore, clock: Clock, events: Events) -> None:
        self._flags = flags
        self._clock = clock
        self._events = events
        self._budgets: dict[str, RetryBudget] = {}

    def budget(self, model: str) -> RetryBudget:
        budget = self._budgets.get(model)
        if budget is None:
            budget = self._budgets[model] = RetryBudget()
        return budget

    def begin(self, model: str, settings: Settings) -> None:
        """A request reaches `model`: it earns the model a share of retries."""
        if settings.enable_retry:
            self.budget(model).record_request(self._clock.now())

    def spend(self, model: str, settings: Settings) -> bool:
        """Take one retry from `model`'s budget for an extra attempt outside the retry loop
        (a stream continuation); False, counted as refused, when the budget is spent."""
        if self.budget(model).try_spend(self._clock.now(), settings.retry_budget_ratio):
            return True
        self._events.emit(RetryBudgetExhausted, model)
        return False

    def delay_before_retry(
        self,
        model: str,
        error: ProviderError,
        retries_made: int,
        deadline: float,
        settings: Settings,
        refused_for_s: float = 0.0,
    ) -> float | None:
        """Seconds to wait before retrying `model`, or None: leave this model.

        `refused_for_s`: how long the model's breaker will refuse calls from now. A wait that
        ends before then is not made (no sleep before a call the breaker will refuse), nor
        counted as a retry."""
        if not settings.enable_retry or not error.retryable or retries_made >= settings.max_retries:
            return None
        delay = backoff_s(retries_made, settings, self._clock.random())
        if error.retry_after_s is not None and error.retry_after_s > delay:
            delay = error.retry_after_s
        now = self._clock.now()
        if now + delay >= deadline or refused_for_s > delay:
            return None
        if not self.budget(model).try_spend(now, settings.retry_budget_ratio):
            self._events.emit(RetryBudgetExhausted, model)
            return None
        self._events.emit(RetryScheduled, model, failure_reason(error), delay)
        return delay
