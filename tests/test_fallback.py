"""Model fallback (SPEC §4): chain order, skipping OPEN models, exhaustion, no-fallback cases."""

from __future__ import annotations

import pytest

from rom_agent.domain.errors import (
    ErrorKind,
    ProviderError,
)
from rom_agent.domain.messages import ModelRef
from rom_agent.resilience.errors import (
    CircuitOpenError,
    ContextLengthExceededError,
    RequestRejectedError,
    UpstreamFailedError,
)
from rom_agent.resilience.fallback import build_chain
from tests.scripted_provider import (
    SIM1,
    SIM2,
    make_harness,
    model_error,
    request_error,
    transient,
)

SIM3 = ModelRef("simulator", "rom-sim-3")
CONFIGURED = (SIM1, SIM2, SIM3)
CHAIN3 = "simulator/rom-sim-1,simulator/rom-sim-2,simulator/rom-sim-3"


def moved(h: object, old: str, new: str, reason: str) -> float:
    labels = {"operation": "converse", "from": old, "to": new, "reason": reason}
    return h.sample("model_fallback_total", **labels)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- chain building


def test_default_chain_is_the_configured_one() -> None:
    assert build_chain(CONFIGURED) == CONFIGURED


def test_primary_goes_first_then_the_rest_in_order() -> None:
    assert build_chain(CONFIGURED, "rom-sim-2") == (SIM2, SIM1, SIM3)
    assert build_chain(CONFIGURED, "simulator/rom-sim-3") == (SIM3, SIM1, SIM2)


def test_explicit_fallbacks_replace_the_rest() -> None:
    assert build_chain(CONFIGURED, "rom-sim-2", ["rom-sim-3"]) == (SIM2, SIM3)
    assert build_chain(CONFIGURED, None, ["rom-sim-3", "rom-sim-1"]) == (SIM1, SIM3)
    assert build_chain(CONFIGURED, "rom-sim-1", []) == (SIM1,)


def test_unknown_models_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown model 'gpt-9'"):
        build_chain(CONFIGURED, "gpt-9")
    with pytest.raises(ValueError, match="unknown model"):
        build_chain(CONFIGURED, "rom-sim-1", ["nope"])


def test_pipeline_chain_for_uses_model_chain() -> None:
    h = make_harness(model_chain=CHAIN3)
    assert h.pipeline.chain == CONFIGURED
    assert h.pipeline.chain_for("rom-sim-3") == (SIM3, SIM1, SIM2)


# --------------------------------------------------------------------------- walking the chain


async def test_falls_back_in_order_and_records_each_step() -> None:
    h = make_harness(model_chain=CHAIN3, enable_retry=False)
    h.provider.script("rom-sim-1", transient(503))
    h.provider.script(
        "rom-sim-2",
        model_error(
            "openai returned 400 (context_length_exceeded)", error_type="context_length_exceeded"
        ),
    )
    result = await h.complete(h.call(chain=CONFIGURED))
    assert result.model == SIM3
    assert result.fallback_used is True
    assert result.attempts == 3
    assert [(f.model, f.reason) for f in result.tried] == [
        ("rom-sim-1", "error"),
        ("rom-sim-2", "context_length"),
    ]
    assert moved(h, "rom-sim-1", "rom-sim-2", "error") == 1
    assert moved(h, "rom-sim-2", "rom-sim-3", "context_length") == 1
    for model in ("rom-sim-1", "rom-sim-2", "rom-sim-3"):
        assert h.sample("model_fallback_attempt_total", operation="converse", model=model) == 1
    assert h.sample("model_fallback_success_total", operation="converse", model="rom-sim-3") == 1
    assert h.sample("model_fallback_exhausted_total", operation="converse") == 0


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (model_error("access denied", status=403), "model_error"),
        (model_error("x", error_type="context_length_exceeded"), "context_length"),
    ],
)
async def test_model_errors_fall_back_at_once_with_a_bounded_reason(
    error: Exception, reason: str
) -> None:
    h = make_harness()
    h.provider.script("rom-sim-1", error)
    result = await h.complete()
    assert result.model == SIM2
    assert h.provider.calls("rom-sim-1") == 1
    assert moved(h, "rom-sim-1", "rom-sim-2", reason) == 1


async def test_open_models_are_skipped_without_a_call() -> None:
    h = make_harness(enable_circuit_breaker=True)
    h.breakers.force_open("rom-sim-1")
    result = await h.complete()
    assert result.model == SIM2
    assert result.fallback_used is True
    assert result.attempts == 1
    assert h.provider.calls("rom-sim-1") == 0
    assert result.tried[0].reason == "circuit_open"
    assert result.tried[0].attempts == 0
    assert moved(h, "rom-sim-1", "rom-sim-2", "circuit_open") == 1
    assert h.sample("circuit_breaker_rejected_total", operation="converse", model="rom-sim-1") == 1
    # A skipped model was not "tried" by the fallback chain.
    assert h.sample("model_fallback_attempt_total", operation="converse", model="rom-sim-1") == 0


async def test_every_model_open_is_circuit_open_with_the_earliest_retry_after() -> None:
    h = make_harness(enable_circuit_breaker=True, circuit_breaker_cooldown_s=30)
    for _ in range(5):
        h.breakers.get("rom-sim-1").acquire().record_failure()
    h.clock.advance(20)  # rom-sim-1 may probe in 10 s
    for _ in range(5):
        h.breakers.get("rom-sim-2").acquire().record_failure()  # in 30 s
    h.clock.advance(0.5)
    with pytest.raises(CircuitOpenError) as excinfo:
        await h.complete()
    error = excinfo.value
    assert (error.status, error.code) == (503, "CIRCUIT_OPEN")
    assert error.retry_after_s == 10  # ceil(9.5)
    assert "rom-sim-1, rom-sim-2" in error.message
    assert h.provider.calls() == 0
    assert h.sample("model_fallback_exhausted_total", operation="converse") == 0


async def test_retry_after_is_at_least_one_second() -> None:
    h = make_harness(enable_circuit_breaker=True, circuit_breaker_cooldown_s=30)
    for model in ("rom-sim-1", "rom-sim-2"):
        for _ in range(5):
            h.breakers.get(model).acquire().record_failure()
    h.clock.advance(29.9)
    with pytest.raises(CircuitOpenError) as excinfo:
        await h.complete()
    assert excinfo.value.retry_after_s == 1


async def test_exhausted_chain_names_each_model_and_why() -> None:
    h = make_harness(max_retries=1)
    h.provider.script("rom-sim-1", transient(503), transient(502))
    h.provider.script("rom-sim-2", model_error("model not found", status=404))
    with pytest.raises(UpstreamFailedError) as excinfo:
        await h.complete()
    error = excinfo.value
    assert (error.status, error.code) == (502, "UPSTREAM_FAILED")
    assert error.message == (
        "All models of the chain failed: rom-sim-1 (error: upstream 502, status 502); "
        "rom-sim-2 (model_error: model not found, status 404)"
    )
    assert [(f.model, f.attempts) for f in error.tried] == [("rom-sim-1", 2), ("rom-sim-2", 1)]
    assert h.sample("model_fallback_exhausted_total", operation="converse") == 1


async def test_failed_then_open_is_upstream_failed_not_circuit_open() -> None:
    h = make_harness(enable_circuit_breaker=True, enable_retry=False)
    h.breakers.force_open("rom-sim-2")
    h.provider.script("rom-sim-1", transient())
    with pytest.raises(UpstreamFailedError) as excinfo:
        await h.complete()
    assert [f.reason for f in excinfo.value.tried] == ["error", "circuit_open"]


async def test_request_errors_stop_the_chain() -> None:
    h = make_harness(enable_circuit_breaker=True)
    h.provider.script("rom-sim-1", request_error("messages: field required"))
    with pytest.raises(RequestRejectedError) as excinfo:
        await h.complete()
    error = excinfo.value
    assert (error.status, error.code) == (400, "INVALID_REQUEST")
    assert error.message == "Request rejected by rom-sim-1: messages: field required"
    assert h.provider.calls() == 1
    assert h.sample("model_fallback_exhausted_total", operation="converse") == 0
    assert h.sample("circuit_breaker_failure_total", operation="converse", model="rom-sim-1") == 0
    assert h.breakers.get("rom-sim-1").snapshot()["totals"]["ignored"] == 1


async def test_unconfigured_provider_is_a_model_error_and_falls_back() -> None:
    h = make_harness()
    ghost = ModelRef("bedrock", "claude")
    result = await h.complete(h.call(chain=(ghost, SIM1)))
    assert result.model == SIM1
    assert result.tried[0].reason == "model_error"
    assert "provider 'bedrock' is not configured" in result.tried[0].message


# --------------------------------------------------------------------------- request-level verdicts


def context_error() -> Exception:
    return model_error(
        "openai returned 400 (context_length_exceeded)",
        status=400,
        error_type="context_length_exceeded",
    )


def policy_error() -> Exception:
    return ProviderError(
        ErrorKind.POLICY,
        "openai returned 400 (content_filter)",
        status=400,
        error_type="content_filter",
    )


async def test_context_length_on_every_model_is_the_clients_400() -> None:
    h = make_harness()
    h.provider.script("rom-sim-1", context_error())
    h.provider.script("rom-sim-2", context_error())
    with pytest.raises(ContextLengthExceededError) as excinfo:
        await h.complete()
    error = excinfo.value
    assert (error.status, error.code, error.openai_code) == (
        400,
        "CONTEXT_LENGTH_EXCEEDED",
        "context_length_exceeded",
    )
    assert h.provider.calls() == 2  # each model got its chance: windows differ


async def test_a_mix_of_context_length_and_outage_keeps_the_502() -> None:
    h = make_harness(enable_retry=False)
    h.provider.script("rom-sim-1", context_error())
    h.provider.script("rom-sim-2", transient(503))
    with pytest.raises(UpstreamFailedError):
        await h.complete()


async def test_a_content_policy_refusal_is_one_attempt_no_fallback_not_counted() -> None:
    h = make_harness(enable_circuit_breaker=True)
    h.provider.script("rom-sim-1", policy_error())
    with pytest.raises(RequestRejectedError) as excinfo:
        await h.complete()
    error = excinfo.value
    assert (error.status, error.code, error.openai_code) == (
        400,
        "CONTENT_FILTERED",
        "content_policy_violation",
    )
    assert h.provider.calls() == 1
    assert h.sample("circuit_breaker_failure_total", operation="converse", model="rom-sim-1") == 0


async def test_content_policy_fallback_is_an_operator_choice() -> None:
    h = make_harness(enable_circuit_breaker=True, content_policy_fallback=True)
    h.provider.script("rom-sim-1", policy_error())
    result = await h.complete()
    assert result.model == SIM2
    assert [(f.reason, f.attempts) for f in result.tried] == [("content_filter", 1)]
    assert h.sample("circuit_breaker_failure_total", operation="converse", model="rom-sim-1") == 0
