"""Stream failover through the pipeline, in virtual time: mid-stream continuation (restart with
prefix verification, prefill) and the hedged first token. The same behaviours over real HTTP
against the fake upstreams are in tests/test_stream_faults.py and tests/test_openai_facade.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from rom_agent.domain.messages import (
    StopEvent,
    TextDelta,
    ToolUseBlock,
    ToolUseEvent,
    Usage,
    UsageEvent,
)
from rom_agent.resilience.errors import StreamInterruptedError, UpstreamFailedError
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

OP = "converse"
USAGE = UsageEvent(Usage(10, 5))
STOP = StopEvent("end_turn")
ANSWER = ("The ", "quick ", "brown ", "fox.")


async def consume(h: Harness, **call: Any) -> tuple[list[Any], BaseException | None]:
    items: list[Any] = []

    async def go() -> BaseException | None:
        try:
            async for item in h.pipeline.stream(h.call(**call)):
                items.append(item)
        except (StreamInterruptedError, UpstreamFailedError) as error:
            return error
        return None

    error = await run(h.clock, go())
    return items, error


def text(items: list[Any]) -> str:
    return "".join(item.text for item in items if isinstance(item, TextDelta))


def continued(h: Harness, model: str, strategy: str, outcome: str) -> float:
    return h.sample(
        "stream_continuation_total", operation=OP, model=model, strategy=strategy, outcome=outcome
    )


def hedges(h: Harness, outcome: str, model: str = "rom-sim-1") -> float:
    return h.sample("hedge_total", operation=OP, model=model, outcome=outcome)


def breaker(h: Harness, outcome: str, model: str = "rom-sim-1") -> float:
    return h.sample(f"circuit_breaker_{outcome}_total", operation=OP, model=model)


def prefills(h: Harness, model: str) -> list[str | None]:
    """Per request to `model`: the trailing assistant text it carried (a prefill), or None."""
    found: list[str | None] = []
    for request in h.provider.requests:
        if request.model != model:
            continue
        last = request.messages[-1]
        found.append(last.plain_text if last.role == "assistant" else None)
    return found


# --------------------------------------------------------------------------- continuation


async def test_a_cut_stream_is_finished_by_a_restart_of_the_same_model() -> None:
    h = make_harness(enable_circuit_breaker=True)
    h.provider.script(
        "rom-sim-1",
        Stream.of("The ", "quick ", transient(503), terminate=False),
        Stream.of(*ANSWER),  # deterministic: re-produces the prefix, then the rest
    )
    items, error = await consume(h)
    assert error is None
    assert text(items) == "".join(ANSWER)  # nothing duplicated
    assert items[0] == StreamStart(SIM1, False, 1)
    assert [i for i in items if isinstance(i, StreamStart)] == [items[0]]  # same model
    assert items[-2:] == [USAGE, STOP]  # usage: what the restart billed (the cut one sent none)
    assert h.provider.calls("rom-sim-1") == 2 and h.provider.calls("rom-sim-2") == 0
    assert prefills(h, "rom-sim-1") == [None, None]  # not declared: never a prefill
    assert continued(h, "rom-sim-1", "restart", "started") == 1
    assert continued(h, "rom-sim-1", "restart", "succeeded") == 1
    assert breaker(h, "failure") == 1 and breaker(h, "success") == 1


async def test_a_restart_forwards_only_text_after_the_prefix_however_it_is_chunked() -> None:
    h = make_harness()
    h.provider.script(
        "rom-sim-1",
        Stream.of("The qu", "ick br", transient(), terminate=False),
        Stream.of("The quick brown fox."),  # the restart arrives in one piece
    )
    items, error = await consume(h)
    assert error is None
    assert [i.text for i in items if isinstance(i, TextDelta)] == ["The qu", "ick br", "own fox."]


async def test_a_diverging_restart_is_never_spliced_and_the_next_model_continues() -> None:
    h = make_harness(prefill_models="simulator/rom-sim-2")
    h.provider.script(
        "rom-sim-1",
        Stream.of("The ", "quick ", transient(), terminate=False),
        Stream.of("A ", "different ", "answer."),  # diverges at its first character
    )
    h.provider.script("rom-sim-2", Stream.of("brown ", "fox."))  # continues the prefill
    items, error = await consume(h)
    assert error is None
    assert text(items) == "The quick brown fox."
    assert StreamStart(SIM2, True, 3) in items  # the model that finished is announced
    assert prefills(h, "rom-sim-1") == [None, None]
    assert prefills(h, "rom-sim-2") == ["The quick"]  # trailing whitespace withheld
    assert continued(h, "rom-sim-1", "restart", "diverged") == 1
    assert continued(h, "rom-sim-2", "prefill", "succeeded") == 1


async def test_when_every_model_diverges_the_client_gets_the_original_error_once() -> None:
    h = make_harness(enable_circuit_breaker=True)
    h.provider.script(
        "rom-sim-1",
        Stream.of("The ", "quick ", transient(), terminate=False),
        Stream.of("The ", "slow ", "dog."),
    )
    h.provider.script("rom-sim-2", Stream.of("Something else."))
    items, error = await consume(h)
    assert isinstance(error, StreamInterruptedError)
    assert error.code == "STREAM_INTERRUPTED" and "rom-sim-1" in str(error)
    assert text(items) == "The quick "  # no diverging text reached the client
    assert not any(isinstance(i, StopEvent) for i in items)
    assert [i for i in items if isinstance(i, StreamStart)] == [items[0]]  # rom-sim-2 unnamed
    assert continued(h, "rom-sim-1", "restart", "diverged") == 1
    assert continued(h, "rom-sim-2", "restart", "diverged") == 1
    # A divergence is no failure of the model: only the cut was counted.
    assert breaker(h, "failure") == 1 and breaker(h, "failure", "rom-sim-2") == 0


async def test_a_restart_that_ends_short_or_turns_to_a_tool_call_diverged() -> None:
    tool = ToolUseEvent(ToolUseBlock("t1", "clock", {}))
    h = make_harness()
    h.provider.script(
        "rom-sim-1", Stream.of("The ", "quick ", transient(), terminate=False), Stream.of("The ")
    )
    h.provider.script("rom-sim-2", Stream.of("The ", tool))
    items, error = await consume(h)
    assert isinstance(error, StreamInterruptedError)
    assert text(items) == "The quick "
    assert tool not in items
    assert continued(h, "rom-sim-1", "restart", "diverged") == 1
    assert continued(h, "rom-sim-2", "restart", "diverged") == 1


async def test_a_stall_is_continued_and_a_continuation_that_moves_on_may_break_again() -> None:
    h = make_harness(stream_idle_timeout_s=5)
    h.provider.script(
        "rom-sim-1",
        Stream.of("The ", HANG, terminate=False),
        Stream.of("The ", "quick ", transient(), terminate=False),  # progress, then a cut
        Stream.of(*ANSWER),
    )
    items, error = await consume(h)
    assert error is None
    assert text(items) == "".join(ANSWER)
    assert h.provider.calls("rom-sim-1") == 3
    assert continued(h, "rom-sim-1", "restart", "failed") == 1
    assert continued(h, "rom-sim-1", "restart", "succeeded") == 1


async def test_continuations_are_bounded_by_max_retries() -> None:
    h = make_harness(max_retries=2)
    cut = Stream.of("The ", transient(), terminate=False)
    h.provider.script("rom-sim-1", cut, cut, cut, cut)
    h.provider.script("rom-sim-2", cut, cut, cut)
    items, error = await consume(h)
    assert isinstance(error, StreamInterruptedError)
    assert text(items) == "The "
    assert h.provider.calls() == 1 + 2


async def test_continuations_spend_the_retry_budget() -> None:
    h = make_harness(retry_budget_ratio=0.0)  # only the floor: 3 per 10 s per model
    started = 0
    for _ in range(5):
        h.provider.script("rom-sim-1", Stream.of("The ", transient(), terminate=False))
        h.provider.script("rom-sim-1", Stream.of(*ANSWER))
        h.provider.script("rom-sim-2", Stream.of("x"))
        await consume(h)
    started = continued(h, "rom-sim-1", "restart", "started")
    assert started == 3
    assert h.sample("retry_budget_exhausted_total", model="rom-sim-1") >= 1


async def test_a_refusal_mid_answer_is_not_continued() -> None:
    h = make_harness()
    h.provider.script(
        "rom-sim-1",
        Stream.of("The ", model_error("content filter", error_type="content_filter")),
    )
    _items, error = await consume(h)
    assert isinstance(error, StreamInterruptedError)
    assert h.provider.calls() == 1


async def test_a_stream_that_forwarded_a_tool_call_is_not_continued() -> None:
    tool = ToolUseEvent(ToolUseBlock("t1", "clock", {}))
    h = make_harness()
    h.provider.script("rom-sim-1", Stream.of("The ", tool, transient(), terminate=False))
    _items, error = await consume(h)
    assert isinstance(error, StreamInterruptedError)
    assert h.provider.calls() == 1


async def test_no_continuation_past_the_deadline() -> None:
    h = make_harness()
    h.provider.script("rom-sim-1", Stream.of("The ", 9.0, transient(), terminate=False))
    _items, error = await consume(h, timeout_s=9.0)
    assert isinstance(error, StreamInterruptedError)
    assert h.provider.calls() == 1


async def test_a_fallback_that_rejects_a_prefill_is_left_and_not_counted() -> None:
    h = make_harness(enable_circuit_breaker=True, prefill_models="simulator/*")
    bad = model_error("prefill not supported", status=400)
    h.provider.script(
        "rom-sim-1",
        Stream.of("The ", transient(), terminate=False),
        bad,
    )
    h.provider.script("rom-sim-2", bad)
    _items, error = await consume(h)
    assert isinstance(error, StreamInterruptedError)
    assert prefills(h, "rom-sim-1") == [None, "The"]
    assert breaker(h, "failure") == 1  # the cut, not the rejection
    assert breaker(h, "failure", "rom-sim-2") == 0


# --------------------------------------------------------------------------- hedged first token


async def test_a_silent_primary_is_hedged_and_ignored_by_its_breaker() -> None:
    h = make_harness(enable_circuit_breaker=True, hedge_delay_s=2, first_token_timeout_s=20)
    h.provider.script("rom-sim-1", HANG)
    h.provider.script("rom-sim-2", Stream.of("backup"))
    start = h.clock.now()
    items, error = await consume(h)
    assert error is None
    assert h.clock.now() - start == pytest.approx(2)  # the hedge delay, not the 20 s timeout
    assert items[0] == StreamStart(SIM2, True, 2)
    assert text(items) == "backup"
    assert hedges(h, "started") == 1 and hedges(h, "hedge_won") == 1
    assert breaker(h, "failure") == 0 and breaker(h, "success") == 0  # cancelled: ignored
    assert h.provider.streams_cancelled == 1
    assert (
        h.sample("llm_request_duration_seconds_count", model="rom-sim-1", outcome="cancelled") == 1
    )


async def test_a_primary_under_the_hedge_delay_is_not_hedged() -> None:
    h = make_harness(hedge_delay_s=2)
    h.provider.script("rom-sim-1", Stream.of(1.5, "primary"))
    items, _error = await consume(h)
    assert text(items) == "primary"
    assert h.provider.calls("rom-sim-2") == 0
    assert hedges(h, "started") == 0


async def test_the_primary_still_wins_after_the_hedge_started() -> None:
    h = make_harness(enable_circuit_breaker=True, hedge_delay_s=2)
    h.provider.script("rom-sim-1", Stream.of(3.0, "primary"))
    h.provider.script("rom-sim-2", Stream.of(5.0, "backup"))
    items, _error = await consume(h)
    assert items[0] == StreamStart(SIM1, False, 2)
    assert text(items) == "primary"
    assert hedges(h, "primary_won") == 1
    assert breaker(h, "failure", "rom-sim-2") == 0 and breaker(h, "success", "rom-sim-2") == 0


async def test_backoff_before_a_retry_does_not_count_towards_the_hedge_delay() -> None:
    h = make_harness(hedge_delay_s=2, retry_base_delay_ms=8000, retry_max_delay_ms=8000)
    h.provider.script("rom-sim-1", transient(), Stream.of(1.5, "primary"))
    start = h.clock.now()
    items, _error = await consume(h)
    assert text(items) == "primary"
    assert h.clock.now() - start > 2  # more than the hedge delay passed, in a deliberate wait
    assert h.provider.calls("rom-sim-2") == 0


async def test_a_primary_that_fails_after_the_hedge_started_leaves_the_answer_to_the_hedge() -> (
    None
):
    h = make_harness(enable_circuit_breaker=True, hedge_delay_s=2)
    h.provider.script("rom-sim-1", Stream.of(3.0, transient(), terminate=False))
    h.provider.script("rom-sim-2", Stream.of(4.0, "backup"))
    items, _error = await consume(h)
    assert text(items) == "backup"
    assert breaker(h, "failure") == 1  # it had failed: counted
    assert h.provider.calls("rom-sim-1") == 1  # no retry of the primary: the hedge took over


async def test_when_both_sides_of_a_hedge_fail_the_chain_failed() -> None:
    h = make_harness(hedge_delay_s=2, max_retries=0)
    h.provider.script("rom-sim-1", Stream.of(3.0, transient(), terminate=False))
    h.provider.script("rom-sim-2", Stream.of(2.5, transient(), terminate=False))
    items, error = await consume(h)
    assert isinstance(error, UpstreamFailedError)
    assert {f.model for f in error.tried} == {"rom-sim-1", "rom-sim-2"}
    assert items == []


async def test_hedges_are_limited_by_their_budget() -> None:
    h = make_harness(hedge_delay_s=2, hedge_budget_ratio=0.0, first_token_timeout_s=4)
    for _ in range(4):  # hedges at t = 2, 5, 8, 11 s: all within one 10 s window
        h.provider.script("rom-sim-1", Stream.of(3.0, "primary"))
        h.provider.script("rom-sim-2", Stream.of(5.0, "backup"))
        items, _ = await consume(h)
        assert text(items) == "primary"
    assert hedges(h, "started") == 3  # the floor of the budget
    assert hedges(h, "budget_exhausted") == 1


async def test_hedging_off_waits_for_the_first_token_timeout() -> None:
    h = make_harness(enable_hedging=False, hedge_delay_s=2, first_token_timeout_s=5)
    h.provider.script("rom-sim-1", HANG)
    h.provider.script("rom-sim-2", Stream.of("backup"))
    start = h.clock.now()
    items, _ = await consume(h)
    assert text(items) == "backup"
    assert h.clock.now() - start == pytest.approx(5)


async def test_a_client_leaving_during_a_hedge_cancels_both_sides() -> None:
    h = make_harness(enable_circuit_breaker=True, hedge_delay_s=2, first_token_timeout_s=20)
    h.provider.script("rom-sim-1", HANG)
    h.provider.script("rom-sim-2", HANG)

    async def leave_after(seconds: float) -> None:
        stream = h.pipeline.stream(h.call())
        task = asyncio.ensure_future(anext(stream))
        await h.clock.sleep(seconds)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await stream.aclose()

    await run(h.clock, leave_after(3))
    await settle()
    assert h.provider.calls() == 2  # the hedge had started
    assert h.provider.streams_cancelled == 2
    for model in ("rom-sim-1", "rom-sim-2"):
        assert breaker(h, "failure", model) == 0 and breaker(h, "success", model) == 0
        assert h.sample("llm_request_duration_seconds_count", model=model, outcome="cancelled") == 1
