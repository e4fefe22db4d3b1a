"""Streaming through the pipeline: one commit point (the first content event).

Before it, failures are retried and rerouted invisibly; after it, a failure is an error the
client sees, never a clean end.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import structlog
import structlog.testing

from rom_agent.domain.events import StreamInterrupted
from rom_agent.domain.messages import (
    StopEvent,
    TextDelta,
    ToolUseBlock,
    ToolUseEvent,
    Usage,
    UsageEvent,
)
from rom_agent.instrumentation.testing import EventRecorder
from rom_agent.resilience.errors import CircuitOpenError, StreamInterruptedError
from rom_agent.resilience.pipeline import StreamStart
from tests.scripted_provider import (
    HANG,
    SIM1,
    SIM2,
    Harness,
    Stream,
    make_harness,
    model_error,
    run,
    settle,
    transient,
)

# Every async test of this module runs on asyncio and on uvloop (production's loop).
from tests.scripted_provider import event_loop_policy as event_loop_policy

OP = "converse"
STOP = StopEvent("end_turn")
USAGE = UsageEvent(Usage(10, 5))


def counted(h: Harness, outcome: str, model: str = "rom-sim-1") -> float:
    return h.sample(f"circuit_breaker_{outcome}_total", operation=OP, model=model)


async def consume(h: Harness, **call: Any) -> tuple[list[Any], StreamInterruptedError | None]:
    """Every item until the end or a StreamInterruptedError (returned, not raised)."""
    items: list[Any] = []

    async def go() -> StreamInterruptedError | None:
        try:
            async for item in h.pipeline.stream(h.call(**call)):
                items.append(item)
        except StreamInterruptedError as error:
            return error
        return None

    error = await run(h.clock, go())
    return items, error


def texts(items: list[Any]) -> list[str]:
    return [item.text for item in items if isinstance(item, TextDelta)]


# --------------------------------------------------------------------------- the happy path


async def test_stream_start_then_events_with_the_terminator_last() -> None:
    h = make_harness(enable_circuit_breaker=True)
    h.provider.script("rom-sim-1", Stream.of("Hel", "lo"))
    items = await h.stream()
    assert items == [StreamStart(SIM1, False, 1), TextDelta("Hel"), TextDelta("lo"), USAGE, STOP]
    assert counted(h, "success") == 1
    assert h.sample("llm_tokens_total", model="rom-sim-1", direction="output") == 5
    assert h.sample("llm_request_duration_seconds_count", model="rom-sim-1", outcome="success") == 1
    assert h.sample("model_fallback_success_total", operation=OP, model="rom-sim-1") == 1
    assert h.provider.streams_closed == 1


async def test_usage_after_the_terminator_is_passed_on_before_it() -> None:
    # Bedrock sends messageStop, then the metadata with usage: StopEvent stays the last item.
    h = make_harness()
    late_usage = UsageEvent(Usage(7, 3))
    h.provider.script("rom-sim-1", Stream.of("a", STOP, late_usage, terminate=False))
    items = await h.stream()
    assert items[1:] == [TextDelta("a"), late_usage, STOP]
    assert h.sample("llm_tokens_total", model="rom-sim-1", direction="input") == 7


async def test_a_tool_use_event_is_a_commit_point_too() -> None:
    h = make_harness()
    tool = ToolUseEvent(ToolUseBlock("t1", "clock", {}))
    h.provider.script("rom-sim-1", Stream.of(tool))
    items = await h.stream()
    assert items[:2] == [StreamStart(SIM1, False, 1), tool]


async def test_a_failure_after_the_terminator_does_not_spoil_the_answer() -> None:
    h = make_harness(enable_circuit_breaker=True)
    h.provider.script("rom-sim-1", Stream.of("a", STOP, transient(), terminate=False))
    items, error = await consume(h)
    assert error is None
    assert items[-1] == STOP
    assert counted(h, "success") == 1


# --------------------------------------------------------------------------- before the commit


async def test_first_token_timeout_falls_back_and_counts_a_failure() -> None:
    h = make_harness(enable_circuit_breaker=True, first_token_timeout_s=5)
    h.provider.script("rom-sim-1", Stream.of(USAGE, HANG))  # usage alone is not a first token
    start = h.clock.now()
    items = await h.stream()
    assert h.clock.now() - start == pytest.approx(5)
    assert items[0] == StreamStart(SIM2, True, 2)
    assert texts(items) == ["ok"]
    assert h.provider.calls("rom-sim-1") == 1  # fell back, no retry of a slow model
    assert h.provider.streams_cancelled == 1  # the abandoned upstream was closed
    assert counted(h, "failure") == 1
    assert (
        h.sample(
            "model_fallback_total",
            operation=OP,
            reason="timeout",
            **{"from": "rom-sim-1", "to": "rom-sim-2"},
        )
        == 1
    )


async def test_cut_before_the_first_chunk_is_retried_invisibly() -> None:
    h = make_harness(enable_circuit_breaker=True)
    h.provider.script("rom-sim-1", Stream.of(transient(503)), Stream.of("fine"))
    items = await h.stream()
    assert items[0] == StreamStart(SIM1, False, 2)
    assert texts(items) == ["fine"]
    assert h.provider.calls("rom-sim-1") == 2
    assert counted(h, "failure") == 1
    assert counted(h, "success") == 1
    assert len(h.clock.slept) >= 1  # a backoff happened


async def test_an_upstream_that_ends_before_any_token_is_retried() -> None:
    h = make_harness()
    h.provider.script("rom-sim-1", Stream.of(terminate=False), Stream.of("x"))
    items = await h.stream()
    assert items[0] == StreamStart(SIM1, False, 2)


async def test_every_model_open_raises_before_any_item() -> None:
    h = make_harness(enable_circuit_breaker=True)
    h.breakers.force_open("rom-sim-1")
    h.breakers.force_open("rom-sim-2")
    stream = h.pipeline.stream(h.call())
    with pytest.raises(CircuitOpenError):
        await anext(stream)
    assert h.provider.calls() == 0


# --------------------------------------------------------------------------- after the commit


async def test_cut_after_the_first_chunk_is_an_interruption_never_a_retry() -> None:
    # Continuation off: the stream ends with the in-band error (continuation: test_failover.py).
    h = make_harness(enable_circuit_breaker=True, enable_stream_continuation=False)
    h.provider.script("rom-sim-1", Stream.of("a", "b", transient(503)))
    items, error = await consume(h)
    assert texts(items) == ["a", "b"]
    assert not any(isinstance(item, StopEvent) for item in items)
    assert error is not None
    assert (error.code, error.status) == ("STREAM_INTERRUPTED", 502)
    assert "rom-sim-1" in error.message and "upstream 503" in error.message
    assert h.provider.calls() == 1  # no retry, no fallback
    assert counted(h, "failure") == 1
    assert h.sample("llm_request_duration_seconds_count", model="rom-sim-1", outcome="error") == 1


async def test_an_interrupted_stream_logs_one_warning_and_reports_an_event() -> None:
    """Issue 12 #8: request id, model, cause and chunks sent, once per broken stream."""
    h = make_harness(enable_circuit_breaker=True)
    recorder = EventRecorder.on(h.events)
    h.provider.script("rom-sim-1", Stream.of("a", "b", "c", transient(503)))
    structlog.contextvars.bind_contextvars(request_id="req-42")
    try:
        with structlog.testing.capture_logs() as logs:
            _, error = await consume(h)
    finally:
        structlog.contextvars.unbind_contextvars("request_id")
    assert error is not None
    warnings = [entry for entry in logs if entry["event"] == "stream interrupted"]
    assert len(warnings) == 1
    line = warnings[0]
    assert line["log_level"] == "warning"
    assert line["model"] == "simulator/rom-sim-1"
    assert line["cause"] == "STREAM_INTERRUPTED"
    assert line["chunks_sent"] == 3
    assert line["request_id"] == "req-42"
    assert recorder.of(StreamInterrupted) == [
        StreamInterrupted("rom-sim-1", "STREAM_INTERRUPTED", line["detail"], 3, "req-42")
    ]


async def test_model_error_mid_stream_interrupts_but_is_not_counted() -> None:
    h = make_harness(enable_circuit_breaker=True)
    h.provider.script("rom-sim-1", Stream.of("a", model_error("content filtered")))
    _, error = await consume(h)
    assert error is not None and error.code == "STREAM_INTERRUPTED"
    assert counted(h, "failure") == 0
    assert h.breakers.get("rom-sim-1").snapshot()["totals"]["ignored"] == 1


async def test_idle_stall_after_the_first_chunk() -> None:
    h = make_harness(
        enable_circuit_breaker=True, stream_idle_timeout_s=7, enable_stream_continuation=False
    )
    h.provider.script("rom-sim-1", Stream.of("a", 6.0, "b", HANG))
    start = h.clock.now()
    items, error = await consume(h)
    assert texts(items) == ["a", "b"]  # a 6 s gap is within the idle limit
    assert h.clock.now() - start == pytest.approx(6 + 7)
    assert error is not None
    assert (error.code, error.status) == ("STREAM_IDLE_TIMEOUT", 504)
    assert counted(h, "failure") == 1
    assert h.provider.streams_cancelled == 1


async def test_missing_terminator_is_an_error_not_a_clean_end() -> None:
    h = make_harness(enable_circuit_breaker=True)
    h.provider.script("rom-sim-1", Stream.of("a", "b", terminate=False))
    items, error = await consume(h)
    assert texts(items) == ["a", "b"]
    assert error is not None and "without a terminator" in error.message
    assert error.code == "STREAM_INTERRUPTED"
    assert counted(h, "failure") == 1
    assert counted(h, "success") == 0


async def test_deadline_mid_stream_is_a_timeout_not_counted() -> None:
    h = make_harness(enable_circuit_breaker=True, stream_idle_timeout_s=30)
    h.provider.script("rom-sim-1", Stream.of("a", HANG))
    start = h.clock.now()
    _, error = await consume(h, timeout_s=10)
    assert h.clock.now() - start == pytest.approx(10)
    assert error is not None and (error.code, error.status) == ("TIMEOUT", 504)
    assert counted(h, "failure") == 0


# --------------------------------------------------------------------------- cancellation


def half_open(h: Harness) -> None:
    for _ in range(h.flags.current.circuit_breaker_threshold):
        h.breakers.get("rom-sim-1").acquire().record_failure()
    h.clock.advance(h.flags.current.circuit_breaker_cooldown_s)
    assert h.state("rom-sim-1") == "HALF_OPEN"


async def test_client_going_away_mid_stream_releases_the_probe_uncounted() -> None:
    h = make_harness(enable_circuit_breaker=True)
    half_open(h)
    h.provider.script("rom-sim-1", Stream.of("a", HANG))
    stream: AsyncIterator[Any] = h.pipeline.stream(h.call())
    assert isinstance(await anext(stream), StreamStart)
    assert await anext(stream) == TextDelta("a")
    breaker = h.breakers.get("rom-sim-1")
    assert breaker.snapshot()["halfOpenInFlight"] == 1
    await stream.aclose()  # what the HTTP layer does when the client disconnects
    assert h.provider.streams_cancelled == 1
    assert breaker.snapshot()["halfOpenInFlight"] == 0
    assert breaker.snapshot()["totals"]["ignored"] == 1
    assert h.state("rom-sim-1") == "HALF_OPEN"
    assert (
        h.sample("llm_request_duration_seconds_count", model="rom-sim-1", outcome="cancelled") == 1
    )


async def test_cancellation_before_the_first_chunk_releases_everything() -> None:
    h = make_harness(enable_circuit_breaker=True)
    half_open(h)
    h.provider.script("rom-sim-1", Stream.of(HANG))

    async def consumer() -> list[Any]:
        return [item async for item in h.pipeline.stream(h.call())]

    task = asyncio.create_task(consumer())
    await settle()
    assert h.breakers.get("rom-sim-1").snapshot()["halfOpenInFlight"] == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert h.provider.streams_cancelled == 1
    assert h.breakers.get("rom-sim-1").snapshot()["halfOpenInFlight"] == 0
    assert counted(h, "failure") == 5  # only the five that tripped it
    # The next stream is admitted as the probe and closes the breaker.
    items = await h.stream()
    assert items[0] == StreamStart(SIM1, False, 1)
    assert h.state("rom-sim-1") == "CLOSED"
