"""The events protocol: routing, lazy construction, isolation of a failing listener, and the
Prometheus adapter following ENABLE_METRICS."""

from __future__ import annotations

import logging

import pytest

from rom_agent.domain.events import (
    AttemptFinished,
    BreakerTransitioned,
    Event,
    Events,
    FallbackAttempted,
)
from rom_agent.instrumentation.prometheus import PrometheusMetrics
from rom_agent.instrumentation.testing import EventRecorder
from tests.scripted_provider import make_flags


def test_untyped_listener_gets_everything_in_order() -> None:
    events = Events()
    recorder = EventRecorder.on(events)
    events.emit(FallbackAttempted, "a")
    events.emit(AttemptFinished, "a", "success", 0.5, 3, 4)
    assert recorder.events == [
        FallbackAttempted("a"),
        AttemptFinished("a", "success", 0.5, 3, 4),
    ]
    assert recorder.of(AttemptFinished)[0].output_tokens == 4


def test_typed_listener_gets_only_its_kinds_and_unsubscribes() -> None:
    events = Events()
    seen: list[Event] = []
    remove = events.subscribe(seen.append, (BreakerTransitioned,))
    everything = EventRecorder.on(events)
    events.emit(FallbackAttempted, "a")
    events.emit(BreakerTransitioned, "a", "CLOSED", "OPEN", "3 consecutive failures")
    assert seen == [BreakerTransitioned("a", "CLOSED", "OPEN", "3 consecutive failures")]
    assert len(everything.events) == 2
    remove()
    everything.unsubscribe()
    events.emit(BreakerTransitioned, "a", "OPEN", "HALF_OPEN", "cooldown passed")
    assert len(seen) == 1 and len(everything.events) == 2
    assert not events.active


def test_an_event_nobody_listens_to_is_not_built() -> None:
    built: list[str] = []

    class Spy(FallbackAttempted):
        def __init__(self, model: str) -> None:
            built.append(model)
            super().__init__(model)

    events = Events()
    events.emit(Spy, "nobody")
    assert built == []
    recorder = EventRecorder.on(events)
    events.emit(Spy, "someone")
    assert built == ["someone"] and len(recorder.events) == 1


def test_a_failing_listener_is_logged_and_the_others_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(event: Event) -> None:
        raise RuntimeError("exporter down")

    events = Events(broken)
    recorder = EventRecorder.on(events)
    with caplog.at_level(logging.ERROR):
        events.emit(FallbackAttempted, "a")  # does not raise
    assert recorder.events == [FallbackAttempted("a")]
    assert "FallbackAttempted" in caplog.text


def test_prometheus_listens_only_while_metrics_are_enabled() -> None:
    flags = make_flags(enable_metrics=True)
    metrics = PrometheusMetrics(lambda: flags.current.enable_metrics, ["m"])
    events = Events()
    metrics.listen(events, flags)

    def attempts() -> float:
        sample = metrics.registry.get_sample_value(
            "llm_request_duration_seconds_count", {"model": "m", "outcome": "success"}
        )
        return sample or 0.0

    events.emit(AttemptFinished, "m", "success", 0.1, 1, 2)
    assert attempts() == 1
    flags.set({"enable_metrics": False})
    assert not events.active
    events.emit(AttemptFinished, "m", "success", 0.1, 1, 2)
    assert attempts() == 1
    flags.set({"enable_metrics": True})
    flags.set({"enable_metrics": True})  # no double subscription
    events.emit(AttemptFinished, "m", "success", 0.1, 1, 2)
    assert attempts() == 2
    tokens = metrics.registry.get_sample_value(
        "llm_tokens_total", {"model": "m", "direction": "output"}
    )
    assert tokens == 4
