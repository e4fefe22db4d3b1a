"""Runtime health series next to the request metrics: process CPU/RSS/file descriptors, event-loop
lag, which feature flags are on, and the admission limits.

These answer "is the process itself healthy?" and "what was switched on when the graph moved?",
which the per-request events cannot: a blocked event loop delays every request without any
of them failing, and an alert on fault injection left on needs the flag as a series.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from rom_agent.config import Settings
from rom_agent.resilience.clock import Clock

# Boolean settings exposed as `feature_flag_enabled{flag=...}`, named as operators set them.
FLAG_NAMES = tuple(
    name
    for name, field in Settings.model_fields.items()
    if name.startswith("enable_") and field.annotation is bool
)


class EventLoopLag:
    """Measures how late the event loop wakes a timer: sleep `interval_s`, then compare the
    wake-up time with the time asked for. Anything that blocks the loop (a sync call, a
    CPU-heavy request) shows up here before it shows up as latency everywhere else."""

    def __init__(self, clock: Clock, interval_s: float = 0.5) -> None:
        self._clock = clock
        self.interval_s = interval_s
        self.last_s = 0.0
        self._task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        while True:
            due = self._clock.now() + self.interval_s
            await self._clock.sleep(self.interval_s)
            self.last_s = max(0.0, self._clock.now() - due)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name="event-loop-lag")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class RuntimeCollector(Collector):
    """Read at scrape time, like the breaker gauges: always the live values."""

    def __init__(self, settings: Callable[[], Settings], lag: EventLoopLag) -> None:
        self._settings = settings
        self._lag = lag

    def collect(self) -> Iterator[Metric]:
        current = self._settings()
        flags = GaugeMetricFamily(
            "feature_flag_enabled", "Feature flag state: 1 on, 0 off", labels=["flag"]
        )
        for name in FLAG_NAMES:
            flags.add_metric([name.upper()], 1.0 if getattr(current, name) else 0.0)
        yield flags
        yield GaugeMetricFamily(
            "bottleneck_max_running",
            "MAX_CONCURRENT: requests allowed to run at once (per process)",
            value=current.max_concurrent,
        )
        yield GaugeMetricFamily(
            "bottleneck_max_queued",
            "MAX_QUEUE: requests allowed to wait (per process)",
            value=current.max_queue,
        )
        yield GaugeMetricFamily(
            "event_loop_lag_seconds",
            "How late the event loop woke the last lag probe (measured every 0.5 s)",
            value=self._lag.last_s,
        )


def install(
    registry: CollectorRegistry, settings: Callable[[], Settings], lag: EventLoopLag
) -> None:
    """Register the runtime series on one service's registry."""
    ProcessCollector(registry=registry)
    registry.register(RuntimeCollector(settings, lag))
