"""Randomized (seeded) stress of the bottleneck on virtual time.

Thousands of requests arrive, hold their slot for random times, fail, release twice, get
cancelled (while queued, right after being granted, while running) or time out, while the
limits and the enable flag change underneath. Invariants are checked at every grant (through
an events listener, which runs synchronously inside the state change) and after every step.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import pytest

from rom_agent.config import Settings
from rom_agent.domain.events import AdmissionGranted, Event, Events
from rom_agent.flags import FlagStore
from rom_agent.instrumentation.prometheus import PrometheusMetrics
from rom_agent.resilience.admission_permits import AdmissionRejected
from rom_agent.resilience.bottleneck import Bottleneck
from rom_agent.resilience.clock import FakeClock

STEPS = 1500
SEEDS = (1, 2, 3)


class CheckingListener:
    """Asserts the concurrency limit at the exact moment of every admission."""

    bottleneck: Bottleneck
    flags: FlagStore
    grants = 0

    def __call__(self, event: Event) -> None:
        if isinstance(event, AdmissionGranted):
            assert self.bottleneck.running <= self.flags.current.max_concurrent
            assert event.waited_s >= 0 and (event.queued or event.waited_s == 0)
            self.grants += 1


@pytest.fixture
def metrics() -> CheckingListener:
    return CheckingListener()


@dataclass
class Tally:
    holding: int = 0  # counted permits held by requests that resumed with them
    resumed: int = 0  # requests that resumed with a counted permit
    served: int = 0
    rejected: int = 0
    cancelled: int = 0
    failed: int = 0


async def settle(steps: int = 8) -> None:
    for _ in range(steps):
        await asyncio.sleep(0)


@pytest.mark.parametrize("seed", SEEDS)
async def test_invariants_hold_under_random_load(seed: int, metrics: CheckingListener) -> None:
    rng = random.Random(seed)
    flags = FlagStore(
        Settings(enable_bottleneck=True, max_concurrent=5, max_queue=20, queue_timeout_s=3.0)
    )
    clock = FakeClock(autoadvance=False)
    prometheus = PrometheusMetrics(enabled=lambda: True, models=["rom-sim-1"])
    bottleneck = Bottleneck(flags, clock, Events(prometheus, metrics))
    metrics.bottleneck, metrics.flags = bottleneck, flags
    prometheus.admission_source = bottleneck
    tally = Tally()

    async def request(hold_s: float, style: str) -> None:
        try:
            permit = await bottleneck.acquire()
        except AdmissionRejected:
            tally.rejected += 1
            return
        counted = permit.counted
        tally.holding += counted
        tally.resumed += counted
        try:
            if style == "context":
                async with permit:
                    await clock.sleep(hold_s)
            else:
                await clock.sleep(hold_s)
                if style == "error":
                    raise RuntimeError("provider failed")
            tally.served += 1
        except RuntimeError:
            tally.failed += 1
        finally:
            tally.holding -= counted
            permit.release()
            if style == "double":
                permit.release()

    tasks: list[asyncio.Task[None]] = []
    limit_ceiling = flags.current.max_concurrent
    queue_ceiling = flags.current.max_queue

    def check() -> None:
        # After a lowering, running (queued) may exceed the new limit (cap) but never grow
        # while it is at or above it: the ceiling follows it down to the live value.
        nonlocal limit_ceiling, queue_ceiling
        settings = flags.current
        running, queued = bottleneck.running, bottleneck.queued
        assert 0 <= running <= max(settings.max_concurrent, limit_ceiling)
        assert 0 <= queued <= max(settings.max_queue, queue_ceiling)
        limit_ceiling = max(settings.max_concurrent, running)
        queue_ceiling = max(settings.max_queue, queued)
        totals = bottleneck.snapshot()["totals"]
        assert totals["admitted"] == totals["completed"] + running  # permits conserved
        assert totals["admitted"] == metrics.grants
        if not settings.enable_bottleneck:
            assert queued == 0

    for step in range(STEPS):
        arriving = rng.choice((0, 0, 1, 2, 3, 8)) if step < STEPS - 100 else 0
        for _ in range(arriving):
            style = rng.choice(("plain", "plain", "context", "error", "double"))
            tasks.append(asyncio.create_task(request(rng.uniform(0.0, 2.0), style)))
        if rng.random() < 0.02:
            flags.set(
                {
                    "max_concurrent": rng.randint(1, 8),
                    "max_queue": rng.randint(0, 25),
                    "queue_timeout_s": rng.choice((0.5, 1.0, 3.0, 10.0)),
                    # Mostly on: the interesting paths need admission control.
                    "enable_bottleneck": rng.random() < 0.9,
                }
            )
        await asyncio.sleep(0)
        check()

        clock.advance(rng.choice((0.0, 0.05, 0.1, 0.25, 0.5)))
        # One loop step in: holders woken by the clock released and handed their slots to
        # waiters that have not resumed yet, so cancelling now hits the hand-off race.
        await asyncio.sleep(0)
        check()
        live = [task for task in tasks[-200:] if not task.done()]
        for task in rng.sample(live, k=min(len(live), rng.choice((0, 0, 0, 1, 2)))):
            task.cancel()
        await settle()
        check()
        assert tally.holding == bottleneck.running  # all grants resumed or were handed on

    # Wind down: no more arrivals; let every request finish or time out.
    for _ in range(200):
        if all(task.done() for task in tasks):
            break
        clock.advance(1.0)
        await settle()
        check()
    assert all(task.done() for task in tasks)

    tally.cancelled = sum(task.cancelled() for task in tasks)
    snapshot = bottleneck.snapshot()
    totals = snapshot["totals"]
    assert (snapshot["running"], snapshot["queued"], tally.holding) == (0, 0, 0)
    assert totals["admitted"] == totals["completed"]
    # Every kind of event really happened, so the invariants were tested where it matters.
    assert totals["rejected"]["queue_full"] > 0 and totals["rejected"]["queue_timeout"] > 0
    assert tally.served > 0 and tally.failed > 0 and tally.cancelled > 0
    assert len(tasks) > 2000
    handed_on = totals["admitted"] - tally.resumed  # granted, then cancelled before resuming
    assert handed_on > 0
    assert prometheus.registry.get_sample_value("bottleneck_running", {}) == 0
    assert prometheus.registry.get_sample_value("bottleneck_queued", {}) == 0
    assert (
        prometheus.registry.get_sample_value("bottleneck_running_total", {"operation": "converse"})
        == totals["admitted"]
    )
    # No timer task is left behind.
    assert asyncio.all_tasks() == {asyncio.current_task()}
