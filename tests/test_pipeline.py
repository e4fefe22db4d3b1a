"""The composed pipeline, non-streaming: layer order, timeouts, deadline, the guide's stage B."""

from __future__ import annotations

import asyncio

import pytest

from rom_agent.domain.messages import (
    Message,
    ToolSpec,
)
from rom_agent.resilience.errors import (
    CircuitOpenError,
    DeadlineExceededError,
    UpstreamFailedError,
)
from rom_agent.resilience.faults import parse_fault_plan
from rom_agent.resilience.pipeline import ModelCall
from tests.scripted_provider import (
    HANG,
    SIM1,
    SIM2,
    Fail,
    Harness,
    Reply,
    make_harness,
    model_error,
    run,
    settle,
    transient,
)

# Every async test of this module runs on asyncio and on uvloop (production's loop).
from tests.scripted_provider import event_loop_policy as event_loop_policy

OP = "converse"


def breaker_count(h: Harness, outcome: str, model: str) -> float:
    return h.sample(f"circuit_breaker_{outcome}_total", operation=OP, model=model)


def gauge(h: Harness, model: str, state: str) -> float | None:
    labels = {"operation": OP, "model": model, "state": state}
    return h.metrics.registry.get_sample_value("circuit_breaker_state", labels)


def attempts(h: Harness, model: str, outcome: str) -> float:
    return h.sample("llm_request_duration_seconds_count", model=model, outcome=outcome)


# --------------------------------------------------------------------------- the happy path


async def test_answer_from_the_primary_with_everything_recorded() -> None:
    h = make_harness(enable_circuit_breaker=True, attempt_timeout_s=45)
    h.provider.script("rom-sim-1", Reply("hi there", delay=1.5))
    hints = {"sim": {"latency_ms": 0}}
    tools = (ToolSpec("clock", "time", {"type": "object"}),)
    call = ModelCall(
        messages=(Message.text("user", "hello"),),
        chain=(SIM1, SIM2),
        deadline=h.clock.now() + 120,
        system="be brief",
        tools=tools,
        max_tokens=256,
        temperature=0.2,
        hints=hints,
    )
    result = await h.complete(call)
    assert result.response.text == "hi there"
    assert (result.model, result.fallback_used, result.attempts, result.tried) == (
        SIM1,
        False,
        1,
        [],
    )
    request = h.provider.requests[0]
    assert request.model == "rom-sim-1"
    assert request.hints is hints  # passed through untouched
    assert (request.system, request.tools, request.max_tokens, request.temperature) == (
        "be brief",
        tools,
        256,
        0.2,
    )
    assert request.timeout_s == 45  # min(ATTEMPT_TIMEOUT_S, time left)
    assert attempts(h, "rom-sim-1", "success") == 1
    assert h.sample("llm_request_duration_seconds_sum", model="rom-sim-1", outcome="success") == 1.5
    assert h.sample("llm_tokens_total", model="rom-sim-1", direction="input") == 10
    assert h.sample("llm_tokens_total", model="rom-sim-1", direction="output") == 5
    assert breaker_count(h, "success", "rom-sim-1") == 1
    assert h.sample("model_fallback_success_total", operation=OP, model="rom-sim-1") == 1


async def test_the_attempt_timeout_shrinks_to_the_time_left() -> None:
    h = make_harness()
    await h.complete(h.call(timeout_s=12.5))
    assert h.provider.requests[0].timeout_s == 12.5


# --------------------------------------------------------------------------- timeouts and deadline


async def test_attempt_timeout_is_a_counted_failure_and_falls_back_without_retry() -> None:
    h = make_harness(enable_circuit_breaker=True, attempt_timeout_s=10)
    h.provider.script("rom-sim-1", HANG)
    start = h.clock.now()
    result = await h.complete()
    assert h.clock.now() - start == pytest.approx(10)
    assert result.model == SIM2
    assert h.provider.calls("rom-sim-1") == 1
    assert result.tried[0].reason == "timeout"
    assert result.tried[0].message == "no answer within 10 s"
    assert breaker_count(h, "failure", "rom-sim-1") == 1
    assert attempts(h, "rom-sim-1", "timeout") == 1
    assert (
        h.sample(
            "model_fallback_total",
            operation=OP,
            reason="timeout",
            **{"from": "rom-sim-1", "to": "rom-sim-2"},
        )
        == 1
    )


async def test_deadline_ends_the_request_and_its_timeout_is_not_counted() -> None:
    h = make_harness(enable_circuit_breaker=True, attempt_timeout_s=60)
    h.provider.script("rom-sim-1", HANG)
    h.provider.script("rom-sim-2", HANG)
    start = h.clock.now()
    with pytest.raises(DeadlineExceededError) as excinfo:
        await h.complete(h.call(timeout_s=100))
    error = excinfo.value
    assert (error.status, error.code) == (504, "TIMEOUT")
    assert h.clock.now() - start == pytest.approx(100)  # 60 s on rom-sim-1, 40 s on rom-sim-2
    assert h.provider.requests[1].timeout_s == pytest.approx(40)
    assert [f.model for f in error.tried] == ["rom-sim-1"]
    assert "rom-sim-1 (timeout" in error.message
    # rom-sim-1 really timed out; rom-sim-2 was cut by our deadline, not by its own slowness.
    assert breaker_count(h, "failure", "rom-sim-1") == 1
    assert breaker_count(h, "failure", "rom-sim-2") == 0
    assert h.breakers.get("rom-sim-2").snapshot()["totals"]["ignored"] == 1


async def test_no_attempt_once_the_deadline_has_passed() -> None:
    h = make_harness()
    with pytest.raises(DeadlineExceededError):
        await h.complete(h.call(timeout_s=0))
    assert h.provider.calls() == 0


async def test_no_retry_whose_wait_would_outlast_the_deadline() -> None:
    h = make_harness(retry_base_delay_ms=8000, retry_max_delay_ms=8000, max_retries=3)
    h.provider.script("rom-sim-1", transient())
    h.provider.script("rom-sim-2", transient())
    with pytest.raises(UpstreamFailedError):
        # Backoffs of 6.8 s and 3.4 s (seeded) cannot fit in 0.2 s: each model gets one call.
        await h.complete(h.call(timeout_s=0.2))
    assert h.provider.calls() == 2
    assert h.clock.slept == []
    assert h.sample("retry_attempts_total", model="rom-sim-1", reason="error") == 0


# --------------------------------------------------------------------------- stage B of the guide


async def test_guide_stage_b_open_half_open_closed() -> None:
    h = make_harness(
        enable_circuit_breaker=True,
        enable_fault_injection=True,
        circuit_breaker_threshold=5,
        circuit_breaker_cooldown_s=30,
    )
    assert gauge(h, "rom-sim-1", "CLOSED") == 0

    for i in range(1, 6):
        plan = parse_fault_plan(f"FORCE_ERROR_{i}", None, h.flags.current)
        with pytest.raises(UpstreamFailedError):
            await h.complete(h.call(f"FORCE_ERROR_{i}", fault=plan))
        h.clock.advance(1)  # the guide sleeps 1 s between requests

    assert h.provider.calls() == 0  # injected faults never reach the provider
    for model in ("rom-sim-1", "rom-sim-2"):
        # Exactly one counted failure per request per model reached.
        assert breaker_count(h, "failure", model) == 5
        assert gauge(h, model, "OPEN") == 2
        assert gauge(h, model, "CLOSED") is None
    assert h.sample("model_fallback_exhausted_total", operation=OP) == 5

    # A sixth request is rejected fast: 503 with Retry-After until rom-sim-1 may probe.
    with pytest.raises(CircuitOpenError) as excinfo:
        await h.complete()
    assert excinfo.value.retry_after_s == 30 - 1  # opened 1 s ago (the guide's sleep)

    h.clock.advance(30)
    # No request: the scrape alone shows HALF_OPEN.
    assert dict(h.breakers.states()) == {"rom-sim-1": "HALF_OPEN", "rom-sim-2": "HALF_OPEN"}
    assert gauge(h, "rom-sim-1", "HALF_OPEN") == 1

    result = await h.complete(h.call("Teste recuperação"))
    assert result.model == SIM1
    assert gauge(h, "rom-sim-1", "CLOSED") == 0
    assert gauge(h, "rom-sim-2", "HALF_OPEN") == 1  # untouched: the primary answered
    transitions = "circuit_breaker_transitions_total"
    for old, new in (("CLOSED", "OPEN"), ("OPEN", "HALF_OPEN"), ("HALF_OPEN", "CLOSED")):
        assert (
            h.sample(transitions, operation=OP, model="rom-sim-1", **{"from": old, "to": new}) == 1
        )


# ------------------------------------------------------------------------ breaker in the pipeline


async def test_breaker_flag_off_is_never_consulted() -> None:
    h = make_harness(enable_circuit_breaker=False, enable_retry=False)
    for _ in range(10):
        h.provider.script("rom-sim-1", transient())
        await h.complete()
    assert h.provider.calls("rom-sim-1") == 10
    assert h.state("rom-sim-1") == "CLOSED"
    assert breaker_count(h, "failure", "rom-sim-1") == 0
    assert h.breakers.get("rom-sim-1").snapshot()["totals"]["failure"] == 0


async def test_model_errors_do_not_count_against_the_breaker() -> None:
    h = make_harness(enable_circuit_breaker=True, circuit_breaker_threshold=1)
    h.provider.script("rom-sim-1", model_error())
    await h.complete()
    assert h.state("rom-sim-1") == "CLOSED"
    assert breaker_count(h, "failure", "rom-sim-1") == 0


async def test_each_retry_attempt_goes_through_the_breaker() -> None:
    h = make_harness(enable_circuit_breaker=True, circuit_breaker_threshold=2, max_retries=3)
    h.provider.script("rom-sim-1", transient(), transient(), transient())
    result = await h.complete()
    # Two counted failures opened it; no retry is slept for or tried against it.
    assert h.provider.calls("rom-sim-1") == 2
    assert h.state("rom-sim-1") == "OPEN"
    assert result.model == SIM2
    assert result.tried[0].reason == "error"  # what the model did, not our rejection
    assert breaker_count(h, "rejected", "rom-sim-1") == 0
    assert len(h.clock.slept) == 1


async def test_cancelled_request_releases_its_probe_uncounted() -> None:
    h = make_harness(enable_circuit_breaker=True)
    for _ in range(5):
        h.breakers.get("rom-sim-1").acquire().record_failure()
    h.clock.advance(30)
    assert h.state("rom-sim-1") == "HALF_OPEN"
    h.provider.script("rom-sim-1", HANG)
    task = asyncio.create_task(h.pipeline.complete(h.call()))
    await settle()
    assert h.breakers.get("rom-sim-1").snapshot()["halfOpenInFlight"] == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    breaker = h.breakers.get("rom-sim-1")
    assert breaker.snapshot()["halfOpenInFlight"] == 0
    assert breaker.snapshot()["totals"]["ignored"] == 1
    assert h.state("rom-sim-1") == "HALF_OPEN"
    assert attempts(h, "rom-sim-1", "cancelled") == 1
    result = await h.complete()  # the next probe is admitted at once
    assert result.model == SIM1
    assert h.state("rom-sim-1") == "CLOSED"


async def test_unclassified_provider_exceptions_count_and_fall_back() -> None:
    h = make_harness(enable_circuit_breaker=True)
    h.provider.script("rom-sim-1", KeyError("boom"))
    result = await h.complete()
    assert result.model == SIM2
    assert h.provider.calls("rom-sim-1") == 1  # not retried
    assert result.tried[0].message == "unexpected KeyError from provider simulator"
    assert breaker_count(h, "failure", "rom-sim-1") == 1


async def test_metrics_off_records_nothing_and_changes_nothing_else() -> None:
    h = make_harness(enable_metrics=False, enable_circuit_breaker=True, enable_retry=False)
    h.provider.script("rom-sim-1", transient())
    result = await h.complete()
    assert result.model == SIM2
    assert attempts(h, "rom-sim-1", "error") == 0
    assert breaker_count(h, "failure", "rom-sim-1") == 0
    assert h.breakers.get("rom-sim-1").snapshot()["totals"]["failure"] == 1


async def test_runtime_flag_changes_apply_to_the_next_request() -> None:
    h = make_harness(max_retries=3)
    h.provider.script("rom-sim-1", transient(), transient())
    assert (await h.complete()).attempts == 3
    h.flags.set({"max_retries": 0})
    h.provider.script("rom-sim-1", transient())
    result = await h.complete()
    assert (result.model, result.attempts) == (SIM2, 2)


async def test_concurrent_failures_open_once_and_late_ones_are_stale() -> None:
    h = make_harness(enable_circuit_breaker=True, enable_retry=False, circuit_breaker_threshold=3)
    h.provider.script("rom-sim-1", *[Fail(transient(), delay=1 + n / 10) for n in range(5)])
    # Five requests in flight on rom-sim-1, all admitted while CLOSED; they fail one by one.
    results = await run(h.clock, asyncio.gather(*[h.pipeline.complete(h.call()) for _ in range(5)]))
    assert [r.model for r in results] == [SIM2] * 5
    assert h.state("rom-sim-1") == "OPEN"
    assert breaker_count(h, "failure", "rom-sim-1") == 5  # every failure measured...
    transitions = h.sample(
        "circuit_breaker_transitions_total",
        operation=OP,
        model="rom-sim-1",
        **{"from": "CLOSED", "to": "OPEN"},
    )
    assert transitions == 1  # ...but the two late ones did not re-trip (and restart the cooldown)
    assert h.breakers.get("rom-sim-1").snapshot()["sinceChangeS"] == pytest.approx(0.2)
