"""The console's live state: one snapshot of the process, pushed about once a second.

Everything is read through the same accessors the admin API uses (breaker and bottleneck
snapshots, the flag store); fallbacks, retries and budget refusals are counted from the core's
events (so they show with ENABLE_METRICS off too). "Last minute" figures are sums of
the increases between samples taken at most once a second while a console is open, so after a
console first connects they cover the time since then (up to a minute). A counter going down
(a breaker `reset`) counts as a restart from zero, never as a negative rate.
"""

from __future__ import annotations

import inspect
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from rom_agent.domain.events import FallbackMoved, RetryBudgetExhausted, RetryScheduled
from rom_agent.services import Services

WINDOW_S = 60.0
RATE_WINDOW_S = 5.0  # rejections per second: over the last few seconds
_MIN_SAMPLE_INTERVAL_S = 0.5


@dataclass
class CounterWindow:
    """Increases of one monotonic counter over a sliding window, from periodic samples."""

    samples: deque[tuple[float, float]] = field(default_factory=deque)

    def add(self, now: float, value: float) -> None:
        self.samples.append((now, value))
        while self.samples and self.samples[0][0] < now - WINDOW_S - 1:
            self.samples.popleft()

    def increase(self, now: float, window_s: float = WINDOW_S) -> float:
        total = 0.0
        previous: float | None = None
        for at, value in self.samples:
            if at < now - window_s:
                continue  # the first sample inside the window is the base
            if previous is not None:
                total += value - previous if value >= previous else value
            previous = value
        return total


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class LiveState:
    """Per process; shared by every open console (the samples are the same for all)."""

    def __init__(self, services: Services) -> None:
        self._services = services
        self._windows: dict[str, CounterWindow] = {}
        self._last_sample = float("-inf")
        self._events = {"fallbacks": 0, "retries": 0, "retryRefused": 0}
        kinds = {FallbackMoved: "fallbacks", RetryScheduled: "retries"}
        kinds[RetryBudgetExhausted] = "retryRefused"

        def count(event: object) -> None:
            self._events[kinds[type(event)]] += 1

        services.events.subscribe(count, kinds)

    def _window(self, key: str) -> CounterWindow:
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = CounterWindow()
        return window

    def _sample(self, now: float, values: Mapping[str, float]) -> None:
        if now - self._last_sample < _MIN_SAMPLE_INTERVAL_S:
            return
        self._last_sample = now
        for key, value in values.items():
            self._window(key).add(now, value)

    def _increase(self, key: str, now: float, window_s: float = WINDOW_S) -> float:
        window = self._windows.get(key)
        return window.increase(now, window_s) if window is not None else 0.0

    async def snapshot(self, rollout: dict[str, Any] | None = None) -> dict[str, Any]:
        services = self._services
        now = services.clock.now()
        wall = time.time()
        settings = services.flags.current
        breakers = services.breakers.snapshot()
        admission = services.bottleneck.snapshot()

        counters: dict[str, float] = {}
        for breaker in breakers["breakers"]:
            model, totals = breaker["model"], breaker["totals"]
            counters[f"failure:{model}"] = totals["failure"]
            counters[f"success:{model}"] = totals["success"]
            counters[f"rejected:{model}"] = totals["rejected"]
        counters.update(self._events)
        counters["admissionRejected"] = float(sum(admission["totals"]["rejected"].values()))
        self._sample(now, counters)

        models = [self._model_view(b, now, wall) for b in breakers["breakers"]]
        return {
            "time": _iso(wall),
            "process": {
                "version": services.version,
                "uptimeS": round(time.monotonic() - services.started_at, 1),
                "startedAt": _iso(services.started_wall),
                "draining": services.draining,
            },
            "breakersEnabled": breakers["enabled"],
            "models": models,
            "fallbacksLastMinute": int(self._increase("fallbacks", now)),
            "admission": {
                "enabled": admission["enabled"],
                "running": admission["running"],
                "limit": admission["maxConcurrent"],
                "queued": admission["queued"],
                "queueLimit": admission["maxQueue"],
                "rejectionsPerS": round(
                    self._increase("admissionRejected", now, RATE_WINDOW_S) / RATE_WINDOW_S, 2
                ),
                "rejectedTotals": admission["totals"]["rejected"],
                "retryAfterS": admission["retryAfterS"],
            },
            "retry": {
                "enabled": settings.enable_retry,
                "maxRetries": settings.max_retries,
                "budgetRatio": settings.retry_budget_ratio,
                "retriesLastMinute": int(self._increase("retries", now)),
                "refusedByBudgetLastMinute": int(self._increase("retryRefused", now)),
            },
            "metricsEnabled": settings.enable_metrics,
            "faultInjection": settings.enable_fault_injection,
            "flagsUpdatedAt": services.flags.updated_at,
            "fleet": await fleet_view(services),
            "rollout": rollout,
        }

    def _model_view(self, breaker: dict[str, Any], now: float, wall: float) -> dict[str, Any]:
        model = breaker["model"]
        state = breaker["state"]
        why = breaker.get("why") or self._guess_why(breaker)
        return {
            "model": model,
            "state": state,
            "forced": breaker["forced"],
            "since": _iso(wall - breaker["sinceChangeS"]),
            "sinceS": breaker["sinceChangeS"],
            "why": why,
            "nextProbeS": breaker["retryAfterS"] if state == "OPEN" else None,
            "consecutiveFailures": breaker["consecutiveFailures"],
            "threshold": breaker["threshold"],
            "failuresLastMinute": int(self._increase(f"failure:{model}", now)),
            "successesLastMinute": int(self._increase(f"success:{model}", now)),
            "rejectedLastMinute": int(self._increase(f"rejected:{model}", now)),
        }

    def _guess_why(self, breaker: dict[str, Any]) -> str:
        """Only when the breaker does not say why itself (older breaker snapshots)."""
        if breaker["forced"]:
            return "forced open by an operator"
        return {
            "OPEN": "failures reached the threshold",
            "HALF_OPEN": "cooldown passed: probing",
        }.get(breaker["state"], "")


async def fleet_view(services: Services) -> dict[str, Any] | None:
    """Fleet mode's replicas and shared-state health, when the fleet package provides them.

    The same `services.fleet.snapshot()` as GET /admin/fleet; without REDIS_URL (one process)
    there is no fleet and the console hides the panel.
    """
    fleet = getattr(services, "fleet", None)
    snapshot = getattr(fleet, "snapshot", None)
    if snapshot is None or not getattr(fleet, "configured", True):
        return None  # single process: no replicas to show
    result = snapshot()
    if inspect.isawaitable(result):
        result = await result
    return dict(result) if isinstance(result, Mapping) else None
