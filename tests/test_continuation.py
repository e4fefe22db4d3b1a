"""The pure parts of mid-stream continuation and hedging: prefix verification, prefill joining,
the prefill declaration, TTFT-derived hedge delays and the hedge budget (injected clock)."""

from __future__ import annotations

import pytest

from rom_agent.config import Settings
from rom_agent.providers.base import Message, ModelRef
from rom_agent.resilience.clock import FakeClock
from rom_agent.resilience.continuation import (
    PREFILL,
    RESTART,
    Diverged,
    PrefillJoiner,
    PrefixVerifier,
    StreamProgress,
    strategy_for,
    with_prefill,
)
from rom_agent.resilience.hedge import CEILING_S, FLOOR_S, MIN_SAMPLES, Hedging

SENT = "The quick brown "


def test_restart_forwards_only_what_follows_the_prefix_however_chunked() -> None:
    for split in range(1, len(SENT) + 8):
        answer = SENT + "fox jumps."
        verifier = PrefixVerifier(SENT)
        pieces = [answer[i : i + split] for i in range(0, len(answer), split)]
        forwarded = "".join(verifier.feed(piece) for piece in pieces)
        verifier.end()
        assert forwarded == "fox jumps."


def test_restart_that_diverges_is_rejected_at_the_first_difference() -> None:
    verifier = PrefixVerifier(SENT)
    assert verifier.feed("The quick") == ""
    with pytest.raises(Diverged):
        verifier.feed(" brawn fox")
    verifier = PrefixVerifier(SENT)
    with pytest.raises(Diverged):
        verifier.feed("The slow")


def test_restart_that_ends_before_the_prefix_diverged() -> None:
    verifier = PrefixVerifier(SENT)
    verifier.feed("The quick")
    with pytest.raises(Diverged):
        verifier.end()


def test_prefill_joiner_drops_only_the_whitespace_the_client_has() -> None:
    assert PrefillJoiner("Hello, ").feed(" world") == "world"
    assert PrefillJoiner("Hello,").feed(" world") == " world"
    joiner = PrefillJoiner("Hello,\n\n")
    assert joiner.feed("\n") == ""  # split across deltas
    assert joiner.feed("\nNext") == "Next"
    assert joiner.feed(" \n") == " \n"  # once past the tail, nothing more is dropped
    assert PrefillJoiner("Hello, ").feed("world") == "world"


def test_prefill_is_the_partial_answer_without_trailing_whitespace() -> None:
    question = Message.text("user", "hi")
    assert with_prefill([question], "Partial answer \n") == (
        question,
        Message.text("assistant", "Partial answer"),
    )


def test_only_declared_models_get_a_prefill() -> None:
    defaults = Settings().prefill_models
    assert strategy_for(ModelRef("bedrock", "anthropic.claude-3-5-sonnet-v2:0"), defaults) == (
        PREFILL
    )
    assert strategy_for(ModelRef("bedrock", "us.anthropic.claude-sonnet-4"), defaults) == PREFILL
    assert strategy_for(ModelRef("bedrock", "amazon.nova-pro-v1:0"), defaults) == RESTART
    assert strategy_for(ModelRef("openai", "gpt-4o"), defaults) == RESTART
    assert strategy_for(ModelRef("openai", "anthropic.claude"), defaults) == RESTART
    assert strategy_for(ModelRef("openai", "my-vllm"), ("openai/my-vllm",)) == PREFILL


def test_a_stream_with_a_forwarded_tool_call_or_no_text_is_not_continued() -> None:
    assert StreamProgress(["par", "tial"]).continuable()
    assert not StreamProgress(["  "]).continuable()
    assert not StreamProgress(["partial"], tool_calls=1).continuable()


def test_hedge_delay_is_p95_times_factor_within_floor_and_ceiling() -> None:
    settings = Settings()
    hedging = Hedging(FakeClock())
    assert hedging.delay_s("m", settings) == CEILING_S  # nothing observed yet
    for i in range(MIN_SAMPLES * 5):
        hedging.observe_first_token("m", 1.0 + (i % 100) / 100)  # 1.00 … 1.99
    assert hedging.delay_s("m", settings) == pytest.approx(1.95 * 1.5, abs=0.02)
    for _ in range(200):
        hedging.observe_first_token("fast", 0.05)
        hedging.observe_first_token("slow", 30.0)
    assert hedging.delay_s("fast", settings) == FLOOR_S
    assert hedging.delay_s("slow", settings) == CEILING_S
    fixed = Settings(hedge_delay_s=0.25)
    assert hedging.delay_s("slow", fixed) == 0.25


def test_hedge_budget_is_a_share_of_recent_requests() -> None:
    clock = FakeClock()
    hedging = Hedging(clock)
    settings = Settings(hedge_budget_ratio=0.1)
    for _ in range(100):
        hedging.request("m")
    spent = sum(hedging.try_spend("m", settings) for _ in range(50))
    assert spent == 10
    clock.advance(11)  # the window slides past: the floor of 3 remains
    assert sum(hedging.try_spend("m", settings) for _ in range(50)) == 3
