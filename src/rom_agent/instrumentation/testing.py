"""The testing switch: record the events a piece of the core emits, instead of monkeypatching
or scraping Prometheus text.

    recorder = EventRecorder.on(events)
    ...
    assert recorder.of(BreakerTransitioned)[-1].new == "OPEN"
"""

from __future__ import annotations

from typing import TypeVar

from rom_agent.domain.events import Event, Events

E = TypeVar("E")


class EventRecorder:
    """A listener that keeps every event, in order."""

    __slots__ = ("events", "unsubscribe")

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.unsubscribe = lambda: None

    @classmethod
    def on(cls, events: Events) -> EventRecorder:
        recorder = cls()
        recorder.unsubscribe = events.subscribe(recorder)
        return recorder

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def of(self, kind: type[E]) -> list[E]:
        return [event for event in self.events if isinstance(event, kind)]

    def clear(self) -> None:
        self.events.clear()
