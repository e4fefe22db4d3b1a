"""Fault injection (SPEC §7): parsing, gating, and the faults' effect through the pipeline."""

from __future__ import annotations

import pytest

from rom_agent.domain.errors import ErrorKind
from rom_agent.domain.messages import (
    StopEvent,
    TextDelta,
)
from rom_agent.resilience.errors import RequestRejectedError, StreamInterruptedError
from rom_agent.resilience.faults import FaultPlan, parse_fault_header, parse_fault_plan
from rom_agent.resilience.pipeline import StreamStart
from tests.scripted_provider import Stream, make_flags, make_harness

ON = make_flags(enable_fault_injection=True).current
OFF = make_flags(enable_fault_injection=False).current


# --------------------------------------------------------------------------- parsing and gating


def test_off_means_ordinary_text_and_ignored_header() -> None:
    assert parse_fault_plan("FORCE_ERROR_1", "status=503", OFF) is None
    assert parse_fault_plan("hi", "this is not valid", OFF) is None  # not even parsed


def test_nothing_requested_means_no_plan() -> None:
    assert parse_fault_plan("hello", None, ON) is None
    assert parse_fault_plan("hello", "  ", ON) is None
    assert parse_fault_plan("say FORCE_ERROR later", None, ON) is None


def test_force_error_prefix() -> None:
    plan = parse_fault_plan("FORCE_ERROR_3", None, ON)
    assert plan == FaultPlan(force_error=True)
    assert parse_fault_plan("  FORCE_ERROR", None, ON) == FaultPlan(force_error=True)


def test_force_error_is_a_transient_non_retryable_503() -> None:
    error = FaultPlan(force_error=True).error()
    assert error.kind is ErrorKind.TRANSIENT
    assert error.status == 503
    assert error.error_type == "InjectedFault"
    assert error.retryable is False
    assert error.message == "injected fault (FORCE_ERROR)"


def test_full_header_with_a_comma_inside_models() -> None:
    plan = parse_fault_plan(
        "hi", "status=503; delay_ms=2000;models=rom-sim-1, rom-sim-2;after_chunks=3", ON
    )
    assert plan == FaultPlan(
        status=503,
        delay_s=2.0,
        models=frozenset({"rom-sim-1", "rom-sim-2"}),
        after_chunks=3,
    )
    assert plan.affects("rom-sim-2")
    assert not plan.affects("rom-sim-3")
    assert FaultPlan(status=500).affects("anything")


@pytest.mark.parametrize(
    ("status", "kind", "retryable"),
    [
        (503, ErrorKind.TRANSIENT, True),
        (429, ErrorKind.TRANSIENT, True),
        (404, ErrorKind.MODEL, False),
        (400, ErrorKind.REQUEST, False),
    ],
)
def test_status_faults_are_classified_like_real_errors(
    status: int, kind: ErrorKind, retryable: bool
) -> None:
    error = FaultPlan(status=status).error()
    assert (error.kind, error.retryable, error.status) == (kind, retryable, status)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("status", "expected key=value"),
        ("status=", "expected key=value"),
        ("status=abc", "status must be an integer"),
        ("status=200", "status must be between 400 and 599"),
        ("delay_ms=-1", "delay_ms must be between"),
        ("after_chunks=x", "after_chunks must be an integer"),
        ("models=,", "models needs at least one model id"),
        ("colour=red", "unknown field 'colour'"),
        ("status=500;status=503", "given twice"),
    ],
)
def test_invalid_headers_raise_a_clear_value_error(header: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_fault_plan("hi", header, ON)


def test_header_keys_are_case_insensitive_and_empty_parts_skipped() -> None:
    assert parse_fault_header("Status=502;;") == {"status": 502}


# --------------------------------------------------------------------------- through the pipeline


async def test_force_error_never_calls_the_provider() -> None:
    h = make_harness()
    with pytest.raises(Exception, match="injected fault"):
        await h.complete(h.call(fault=FaultPlan(force_error=True)))
    assert h.provider.calls() == 0


async def test_models_limit_the_fault_to_some_models() -> None:
    h = make_harness()
    plan = FaultPlan(force_error=True, models=frozenset({"rom-sim-1"}))
    result = await h.complete(h.call(fault=plan))
    assert result.model.id == "rom-sim-2"
    assert h.provider.calls("rom-sim-1") == 0
    assert h.provider.calls("rom-sim-2") == 1


async def test_status_fault_is_retried_like_a_real_503() -> None:
    h = make_harness(max_retries=2)
    plan = FaultPlan(status=503, models=frozenset({"rom-sim-1"}))
    result = await h.complete(h.call(fault=plan))
    assert result.attempts == 4  # 3 on rom-sim-1 (never called), 1 on rom-sim-2
    assert h.provider.calls() == 1


async def test_status_400_fault_is_a_request_rejection() -> None:
    h = make_harness()
    with pytest.raises(RequestRejectedError):
        await h.complete(h.call(fault=FaultPlan(status=400)))


async def test_delay_runs_on_the_injected_clock_inside_the_attempt_timeout() -> None:
    h = make_harness(attempt_timeout_s=5)
    start = h.clock.now()
    result = await h.complete(h.call(fault=FaultPlan(delay_s=2.0)))
    assert result.model.id == "rom-sim-1"
    assert h.clock.now() - start == pytest.approx(2.0)
    # Longer than the attempt timeout: the attempt times out and the chain moves on.
    plan = FaultPlan(delay_s=6.0, models=frozenset({"rom-sim-1"}))
    result = await h.complete(h.call(fault=plan))
    assert result.model.id == "rom-sim-2"
    assert result.tried[0].reason == "timeout"


async def test_after_chunks_with_status_fails_the_stream_mid_way() -> None:
    h = make_harness(enable_stream_continuation=False)  # else the cut is continued
    h.provider.script("rom-sim-1", Stream.of("a", "b", "c", "d", "e"))
    plan = FaultPlan(status=503, after_chunks=3)
    items = []
    with pytest.raises(StreamInterruptedError) as excinfo:
        async for item in h.pipeline.stream(h.call(fault=plan)):
            items.append(item)
    assert isinstance(items[0], StreamStart)
    assert [i.text for i in items[1:]] == ["a", "b", "c"]
    assert "injected fault (status 503)" in excinfo.value.message
    assert h.provider.streams_closed == 1


async def test_after_chunks_without_status_drops_the_connection() -> None:
    h = make_harness()
    h.provider.script("rom-sim-1", Stream.of("a", "b", "c"))
    with pytest.raises(StreamInterruptedError, match="without a terminator"):
        await h.stream(h.call(fault=FaultPlan(after_chunks=2)))


async def test_after_zero_chunks_fails_before_the_commit_and_falls_back() -> None:
    h = make_harness(enable_retry=False)
    plan = FaultPlan(status=503, after_chunks=0, models=frozenset({"rom-sim-1"}))
    items = await h.stream(h.call(fault=plan))
    assert items[0] == StreamStart(h.chain[1], True, 2)
    assert isinstance(items[1], TextDelta)
    assert isinstance(items[-1], StopEvent)


async def test_after_chunks_on_a_short_stream_never_triggers() -> None:
    h = make_harness()
    h.provider.script("rom-sim-1", Stream.of("a"))
    items = await h.stream(h.call(fault=FaultPlan(status=503, after_chunks=5)))
    assert isinstance(items[-1], StopEvent)


async def test_after_chunks_cuts_a_non_streamed_answer_after_the_call() -> None:
    h = make_harness(enable_retry=False)
    plan = FaultPlan(after_chunks=1, models=frozenset({"rom-sim-1"}))
    result = await h.complete(h.call(fault=plan))
    assert h.provider.calls("rom-sim-1") == 1  # the upstream was called, then "cut"
    assert result.model.id == "rom-sim-2"
