"""Retry decisions: backoff sequences, Retry-After, deadline, budget (no sleeps)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from rom_agent.domain.errors import (
    ErrorKind,
    ProviderError,
)
from rom_agent.domain.events import Events
from rom_agent.instrumentation.prometheus import PrometheusMetrics as Metrics
from rom_agent.resilience.clock import FakeClock
from rom_agent.resilience.faults import FaultPlan
from rom_agent.resilience.retry import (
    MIN_RETRIES_PER_WINDOW,
    Retry,
    RetryBudget,
    backoff_s,
)
from tests.scripted_provider import (
    Harness,
    make_flags,
    make_harness,
    model_error,
    request_error,
    transient,
)

MODEL = "rom-sim-1"
FAR = 10_000.0  # a deadline that never binds


class Env:
    def __init__(self, seed: int = 7, **overrides: Any) -> None:
        self.clock = FakeClock(seed=seed)
        self.flags = make_flags(**overrides)
        self.metrics = Metrics(lambda: self.flags.current.enable_metrics, [MODEL])
        self.events = Events(self.metrics)
        self.retry = Retry(self.flags, self.clock, self.events)

    def delay(
        self, error: ProviderError, retries_made: int = 0, deadline: float = FAR
    ) -> float | None:
        settings = self.flags.current
        return self.retry.delay_before_retry(
            MODEL, error, retries_made, self.clock.now() + deadline, settings
        )

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


# --------------------------------------------------------------------------- backoff


def test_full_jitter_sequence_is_exact_for_a_seeded_clock() -> None:
    env = Env(seed=7, retry_base_delay_ms=500, retry_max_delay_ms=8000, max_retries=6)
    for _ in range(30):  # enough traffic that the budget (20 %) does not interfere
        env.retry.begin(MODEL, env.flags.current)
    rng = random.Random(7)
    expected = [rng.random() * cap for cap in (0.5, 1.0, 2.0, 4.0, 8.0, 8.0)]
    got = [env.delay(transient(), n) for n in range(6)]
    assert got == pytest.approx(expected, rel=0, abs=1e-12)


def test_backoff_caps_at_the_max_delay() -> None:
    settings = make_flags(retry_base_delay_ms=500, retry_max_delay_ms=3000).current
    assert backoff_s(0, settings, 1.0) == 0.5
    assert backoff_s(2, settings, 1.0) == 2.0
    assert backoff_s(3, settings, 1.0) == 3.0
    assert backoff_s(9, settings, 0.5) == 1.5


def test_max_retries_bounds_the_retries_of_one_model() -> None:
    env = Env(max_retries=2)
    assert env.delay(transient(), 0) is not None
    assert env.delay(transient(), 1) is not None
    assert env.delay(transient(), 2) is None


# --------------------------------------------------------------------------- Retry-After


def test_retry_after_longer_than_the_backoff_is_honoured() -> None:
    env = Env()
    assert env.delay(transient(429, retry_after_s=5.0)) == 5.0
    assert env.sample("retry_attempts_total", model=MODEL, reason="rate_limited") == 1


def test_backoff_longer_than_retry_after_wins() -> None:
    env = Env(seed=7, retry_base_delay_ms=8000, retry_max_delay_ms=8000)
    expected = random.Random(7).random() * 8.0
    assert env.delay(transient(429, retry_after_s=0.001)) == pytest.approx(expected)


def test_retry_after_beyond_the_deadline_leaves_the_model() -> None:
    env = Env()
    assert env.delay(transient(429, retry_after_s=30.0), deadline=29.0) is None
    # Not a budget refusal, not a retry.
    assert env.sample("retry_budget_exhausted_total", model=MODEL) == 0
    assert env.sample("retry_attempts_total", model=MODEL, reason="rate_limited") == 0


def test_a_wait_ending_exactly_at_the_deadline_is_not_made() -> None:
    """The boundary: a retry that would start at the deadline has no time left to run."""
    env = Env()
    assert env.delay(transient(429, retry_after_s=30.0), deadline=30.0) is None
    assert env.delay(transient(429, retry_after_s=30.0), deadline=30.001) == 30.0


def test_backoff_beyond_the_deadline_leaves_the_model() -> None:
    env = Env(retry_base_delay_ms=8000, retry_max_delay_ms=8000)
    assert env.delay(transient(), deadline=0.01) is None


# --------------------------------------------------------------------------- what is retried


@pytest.mark.parametrize(
    "error",
    [
        FaultPlan(force_error=True).error(),
        model_error(),
        request_error(),
        ProviderError(
            ErrorKind.TRANSIENT, "timed out", error_type="AttemptTimeout", retryable=False
        ),
    ],
    ids=["force_error", "model", "request", "not_retryable"],
)
def test_non_retryable_errors_are_never_retried(error: ProviderError) -> None:
    env = Env()
    assert env.delay(error) is None


def test_injected_status_faults_are_retried_like_real_ones() -> None:
    env = Env()
    assert env.delay(FaultPlan(status=503).error()) is not None
    assert env.delay(FaultPlan(status=404).error()) is None


def test_retry_disabled_means_no_retry_and_no_budget_bookkeeping() -> None:
    env = Env(enable_retry=False)
    env.retry.begin(MODEL, env.flags.current)
    assert env.delay(transient()) is None
    assert env.retry.budget(MODEL).window(env.clock.now()) == (0, 0)


def test_retry_flag_applies_at_once() -> None:
    env = Env()
    assert env.delay(transient()) is not None
    env.flags.set({"enable_retry": False})
    assert env.delay(transient()) is None


# --------------------------------------------------------------------------- budget


def test_budget_floor_allows_a_few_retries_then_refuses() -> None:
    env = Env()
    env.retry.begin(MODEL, env.flags.current)
    for _ in range(MIN_RETRIES_PER_WINDOW):
        assert env.delay(transient()) is not None
    assert env.delay(transient()) is None
    assert env.sample("retry_budget_exhausted_total", model=MODEL) == 1
    assert env.sample("retry_attempts_total", model=MODEL, reason="error") == 3


def test_budget_grows_with_traffic_as_a_ratio() -> None:
    env = Env(retry_budget_ratio=0.2)
    for _ in range(50):
        env.retry.begin(MODEL, env.flags.current)
    granted = sum(env.delay(transient()) is not None for _ in range(20))
    assert granted == 10  # 20 % of 50


@pytest.mark.parametrize(("requests", "allowed"), [(16, 3), (26, 5), (29, 5), (30, 6)])
def test_budget_is_the_floor_of_ratio_times_requests(requests: int, allowed: int) -> None:
    """Issue 12 #7: 16 requests x 0.2 = 3.2 allow 3 retries (documented), not 4."""
    env = Env(retry_budget_ratio=0.2)
    for _ in range(requests):
        env.retry.begin(MODEL, env.flags.current)
    granted = sum(env.delay(transient()) is not None for _ in range(20))
    assert granted == allowed


def test_budget_window_slides_on_the_clock() -> None:
    budget = RetryBudget()
    now = 100.0
    for _ in range(3):
        assert budget.try_spend(now, 0.2)
    assert not budget.try_spend(now, 0.2)
    assert not budget.try_spend(now + 9.9, 0.2)  # the spent bucket is still in the window
    assert budget.try_spend(now + 10.0, 0.2)  # ten buckets later it has slid out
    assert budget.window(now + 10.0) == (0, 1)


def test_budgets_are_per_model() -> None:
    env = Env()
    for _ in range(MIN_RETRIES_PER_WINDOW):
        assert env.delay(transient()) is not None
    assert env.delay(transient()) is None
    other = env.retry.delay_before_retry(
        "rom-sim-2", transient(), 0, env.clock.now() + FAR, env.flags.current
    )
    assert other is not None


# --------------------------------------------------------------------------- through the pipeline


async def test_pipeline_retries_with_exact_delays_then_answers() -> None:
    h: Harness = make_harness(retry_base_delay_ms=500, retry_max_delay_ms=8000)
    h.provider.script(MODEL, transient(503), transient(500), transient(429))
    result = await h.complete()
    rng = random.Random(0)  # FakeClock's default seed
    assert h.clock.slept == pytest.approx([rng.random() * c for c in (0.5, 1.0, 2.0)])
    assert result.model.id == MODEL
    assert result.attempts == 4
    assert result.fallback_used is False
    assert h.provider.calls(MODEL) == 4
    assert h.sample("retry_attempts_total", model=MODEL, reason="error") == 2
    assert h.sample("retry_attempts_total", model=MODEL, reason="rate_limited") == 1


async def test_pipeline_honours_retry_after() -> None:
    h = make_harness()
    h.provider.script(MODEL, transient(429, retry_after_s=7.0))
    result = await h.complete()
    assert h.clock.slept == [7.0]
    assert result.attempts == 2


async def test_pipeline_moves_on_when_retry_after_exceeds_the_deadline() -> None:
    h = make_harness()
    h.provider.script(MODEL, transient(429, retry_after_s=50.0))
    result = await h.complete(h.call(timeout_s=40))
    assert h.clock.slept == []
    assert result.model.id == "rom-sim-2"
    assert result.attempts == 2
    assert (
        h.sample(
            "model_fallback_total",
            operation="converse",
            **{"from": MODEL, "to": "rom-sim-2", "reason": "rate_limited"},
        )
        == 1
    )


async def test_pipeline_exhausts_max_retries_then_falls_back() -> None:
    h = make_harness(max_retries=2)
    h.provider.script(MODEL, *[transient()] * 5)
    result = await h.complete()
    assert h.provider.calls(MODEL) == 3
    assert result.model.id == "rom-sim-2"
    assert result.attempts == 4
    assert len(h.clock.slept) == 2


async def test_pipeline_budget_exhaustion_moves_to_the_next_model() -> None:
    h = make_harness(max_retries=10)
    h.provider.script(MODEL, *[transient()] * 20)
    result = await h.complete()
    # One request reached the model: the floor of 3 retries, then the budget refuses.
    assert h.provider.calls(MODEL) == 1 + MIN_RETRIES_PER_WINDOW
    assert result.model.id == "rom-sim-2"
    assert h.sample("retry_budget_exhausted_total", model=MODEL) == 1


async def test_no_backoff_is_slept_before_a_call_the_breaker_will_refuse() -> None:
    """Issue 16 #5: the failure that opens the breaker leaves the model at once."""
    h = make_harness(enable_circuit_breaker=True, circuit_breaker_threshold=2, max_retries=5)
    h.provider.script(MODEL, transient(503), transient(503), transient(503))
    result = await h.complete()
    assert h.provider.calls(MODEL) == 2  # the second failure opened the breaker
    assert len(h.clock.slept) == 1  # one backoff, before the second call; none after it
    assert result.model.id == "rom-sim-2"
    assert h.sample("retry_attempts_total", model=MODEL, reason="error") == 1


async def test_a_backoff_longer_than_the_cooldown_is_still_slept() -> None:
    """A breaker that will admit a probe by the end of the wait does not stop the retry."""
    h = make_harness(
        enable_circuit_breaker=True,
        circuit_breaker_threshold=1,
        circuit_breaker_cooldown_s=1,
        max_retries=1,
    )
    h.provider.script(MODEL, transient(429, retry_after_s=5.0))
    result = await h.complete()
    assert h.clock.slept == [5.0]
    assert result.model.id == MODEL  # the probe after the wait answered


async def test_pipeline_with_retry_disabled_makes_one_attempt_per_model() -> None:
    h = make_harness(enable_retry=False)
    h.provider.script(MODEL, transient())
    h.provider.script("rom-sim-2", transient())
    with pytest.raises(Exception, match="All models of the chain failed"):
        await h.complete()
    assert h.provider.calls(MODEL) == 1
    assert h.provider.calls("rom-sim-2") == 1
    assert h.clock.slept == []


@pytest.mark.parametrize(
    "error", [model_error(), FaultPlan(force_error=True).error()], ids=["model", "force_error"]
)
async def test_pipeline_never_retries_model_or_injected_errors(error: ProviderError) -> None:
    h = make_harness()
    h.provider.script(MODEL, error)
    result = await h.complete()
    assert h.provider.calls(MODEL) == 1
    assert result.model.id == "rom-sim-2"
    assert h.clock.slept == []
