"""Admission control (SPEC §5): deterministic tests on virtual time, no real sleeps."""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

import pytest

from rom_agent.config import Settings
from rom_agent.domain.events import Events
from rom_agent.flags import FlagStore
from rom_agent.instrumentation.prometheus import PrometheusMetrics as Metrics
from rom_agent.resilience.admission_permits import AdmissionRejected, Permit
from rom_agent.resilience.bottleneck import Bottleneck
from rom_agent.resilience.clock import FakeClock

OP = {"operation": "converse"}
T = TypeVar("T")


def make(
    *,
    max_concurrent: int = 5,
    max_queue: int = 20,
    queue_timeout_s: float = 30.0,
    enabled: bool = True,
    metrics: Metrics | None = None,
) -> tuple[Bottleneck, FlagStore, FakeClock]:
    settings = Settings(
        enable_bottleneck=enabled,
        max_concurrent=max_concurrent,
        max_queue=max_queue,
        queue_timeout_s=queue_timeout_s,
    )
    flags = FlagStore(settings)
    clock = FakeClock(autoadvance=False)
    events = Events(metrics) if metrics is not None else None
    return Bottleneck(flags, clock, events), flags, clock


async def settle(steps: int = 8) -> None:
    """Let every task woken so far run up to its next real suspension."""
    for _ in range(steps):
        await asyncio.sleep(0)


async def finished(task: asyncio.Task[T]) -> T:
    """The task's result (or its exception raised) once it should be done — a broken
    bottleneck fails the test instead of hanging it."""
    await settle()
    assert task.done(), "still waiting"
    return task.result()


def acquire_now(bottleneck: Bottleneck) -> Permit:
    """`acquire()` when it must answer at once: admission and rejection never suspend, so one
    step of the coroutine returns the permit or raises. A queued request fails the test."""
    step = bottleneck.acquire()
    try:
        step.send(None)
    except StopIteration as admitted:
        return admitted.value
    step.close()
    raise AssertionError("acquire() suspended: the request was queued")


def start(bottleneck: Bottleneck) -> asyncio.Task[Permit]:
    return asyncio.create_task(bottleneck.acquire())


async def cancel_all(*tasks: asyncio.Task[Any]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(enabled=lambda: True, models=["rom-sim-1", "rom-sim-2"])


def sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float | None:
    return metrics.registry.get_sample_value(name, labels or {})


# ---------------------------------------------------------------------------- admission


async def test_admits_up_to_the_limit_then_queues() -> None:
    bottleneck, _, _ = make(max_concurrent=2)
    first = acquire_now(bottleneck)
    second = acquire_now(bottleneck)
    third = start(bottleneck)
    await settle()

    assert (bottleneck.running, bottleneck.queued) == (2, 1)
    assert not third.done()
    assert first.waited_s == 0.0 and first.counted

    first.release()
    assert (bottleneck.running, bottleneck.queued) == (2, 0)  # handed over, not freed
    permit = await finished(third)
    await settle()
    assert asyncio.all_tasks() == {asyncio.current_task()}  # its queue timer was cancelled
    second.release()
    permit.release()
    assert (bottleneck.running, bottleneck.queued) == (0, 0)


async def test_admission_and_rejection_never_suspend() -> None:
    bottleneck, _, _ = make(max_concurrent=1, max_queue=0)
    admitting = bottleneck.acquire()
    with pytest.raises(StopIteration) as admitted:
        admitting.send(None)  # finishes on its first step: no await on the fast path
    assert isinstance(admitted.value.value, Permit)

    rejecting = bottleneck.acquire()
    with pytest.raises(AdmissionRejected):
        rejecting.send(None)  # rejected on its first step too


async def test_waiters_are_served_in_arrival_order() -> None:
    bottleneck, _, _ = make(max_concurrent=1)
    holder = acquire_now(bottleneck)
    served: list[int] = []

    async def request(number: int) -> None:
        async with await bottleneck.acquire():
            served.append(number)

    tasks = []
    for number in range(6):
        tasks.append(asyncio.create_task(request(number)))
        await settle()  # enqueue one at a time, so arrival order is unambiguous
    holder.release()
    for task in tasks:
        await finished(task)

    assert served == [0, 1, 2, 3, 4, 5]
    assert (bottleneck.running, bottleneck.queued) == (0, 0)


async def test_a_newcomer_cannot_take_a_slot_handed_to_the_queue() -> None:
    bottleneck, _, _ = make(max_concurrent=1)
    holder = acquire_now(bottleneck)
    waiter = start(bottleneck)
    await settle()

    holder.release()  # the slot goes to `waiter`, which has not resumed yet
    newcomer = start(bottleneck)
    await settle()

    assert waiter.done() and not newcomer.done()
    (await finished(waiter)).release()
    (await finished(newcomer)).release()


async def test_guide_burst_5_running_20_queued_30_arrivals() -> None:
    bottleneck, _, clock = make(max_concurrent=5, max_queue=20)
    started = clock.now()

    async def slow_request() -> str:
        async with await bottleneck.acquire():
            await clock.sleep(2.0)
        return "ok"

    tasks = [asyncio.create_task(slow_request()) for _ in range(30)]
    await settle()

    rejected = [task.exception() for task in tasks if task.done()]
    assert len(rejected) == 5 and clock.now() == started  # rejected at once, before any work
    assert (bottleneck.running, bottleneck.queued) == (5, 20)
    for error in rejected:
        assert isinstance(error, AdmissionRejected)
        assert (error.reason, error.code, error.status) == ("queue_full", "QUEUE_FULL", 503)
        assert str(error) == error.message
        assert error.message == "Service temporarily unavailable: queue full (20/20)"
        assert error.retry_after_s is not None and error.retry_after_s >= 1

    for _ in range(5):  # 25 requests, 5 at a time, 2 s each: done after 10 s
        clock.advance(2.0)
        await settle()

    assert all(task.done() for task in tasks)
    results = [task.exception() or task.result() for task in tasks]
    assert results.count("ok") == 25
    assert sum(isinstance(result, AdmissionRejected) for result in results) == 5
    totals = bottleneck.snapshot()["totals"]
    assert totals["admitted"] == totals["completed"] == 25
    assert totals["rejected"] == {"queue_full": 5, "queue_timeout": 0, "draining": 0}


# ---------------------------------------------------------------------------- Retry-After


async def test_retry_after_estimates_from_recent_service_time() -> None:
    bottleneck, _, clock = make(max_concurrent=2, max_queue=2, queue_timeout_s=60)
    # No sample yet: 1 s prior × (2 queued + 1) / 2 running = 1.5 → 2.
    held = [acquire_now(bottleneck) for _ in range(2)]
    waiters = [start(bottleneck) for _ in range(2)]
    await settle()
    with pytest.raises(AdmissionRejected) as prior:
        acquire_now(bottleneck)
    assert prior.value.retry_after_s == 2

    # One request held for 3 s: 3 × 3 / 2 = 4.5 → 5.
    clock.advance(3.0)
    held.pop().release()
    waiters.append(start(bottleneck))
    await settle()
    with pytest.raises(AdmissionRejected) as measured:
        acquire_now(bottleneck)
    assert measured.value.retry_after_s == 5
    assert bottleneck.snapshot()["serviceTimeS"] == 3.0

    # The next sample moves the average by 20 %: 3 + 0.2 × (13 − 3) = 5 → 5 × 3 / 2 = 7.5 → 8.
    clock.advance(10.0)
    held.pop().release()
    waiters.append(start(bottleneck))
    await settle()
    assert bottleneck.retry_after_s() == 8
    await cancel_all(*waiters)


@pytest.mark.parametrize(
    ("service_s", "queue_timeout_s", "expected"),
    [(0.0, 30.0, 1), (0.1, 30.0, 1), (100.0, 30.0, 30), (100.0, 0.5, 1)],
)
async def test_retry_after_is_whole_seconds_between_1_and_the_queue_timeout(
    service_s: float, queue_timeout_s: float, expected: int
) -> None:
    bottleneck, _, clock = make(max_concurrent=1, max_queue=0, queue_timeout_s=queue_timeout_s)
    permit = acquire_now(bottleneck)
    clock.advance(service_s)
    permit.release()
    acquire_now(bottleneck)
    with pytest.raises(AdmissionRejected) as rejected:
        acquire_now(bottleneck)
    assert rejected.value.retry_after_s == expected


# ---------------------------------------------------------------------------- queue timeout


async def test_a_waiter_times_out_after_queue_timeout_s() -> None:
    bottleneck, _, clock = make(max_concurrent=1, queue_timeout_s=30)
    holder = acquire_now(bottleneck)
    waiter = start(bottleneck)
    await settle()

    clock.advance(29)
    await settle()
    assert not waiter.done() and bottleneck.queued == 1

    clock.advance(1)
    await settle()
    with pytest.raises(AdmissionRejected) as rejected:
        await finished(waiter)
    assert (rejected.value.reason, rejected.value.code) == ("queue_timeout", "QUEUE_TIMEOUT")
    assert rejected.value.status == 503 and rejected.value.retry_after_s is not None
    assert (bottleneck.running, bottleneck.queued) == (1, 0)

    holder.release()  # the timed-out waiter is not served later
    assert bottleneck.running == 0


async def test_queue_timeout_is_read_when_the_waiter_arrives() -> None:
    bottleneck, flags, clock = make(max_concurrent=1, queue_timeout_s=30)
    holder = acquire_now(bottleneck)
    early = start(bottleneck)
    await settle()
    flags.set({"queue_timeout_s": 5})
    late = start(bottleneck)
    await settle()

    clock.advance(5)
    await settle()
    assert late.done() and not early.done()
    clock.advance(25)
    await settle()
    assert early.done()
    for task in (early, late):
        with pytest.raises(AdmissionRejected):
            await finished(task)
    holder.release()


async def test_admission_wins_over_a_timeout_firing_in_the_same_step() -> None:
    bottleneck, _, clock = make(max_concurrent=1, queue_timeout_s=30)
    holder = acquire_now(bottleneck)
    waiter = start(bottleneck)
    await settle()

    clock.advance(30)  # the timer is due but has not run yet
    holder.release()  # ... and the slot is handed over first
    await settle()

    permit = await finished(waiter)
    assert permit.waited_s == 30
    assert bottleneck.snapshot()["totals"]["rejected"]["queue_timeout"] == 0
    permit.release()
    assert bottleneck.running == 0


# ---------------------------------------------------------------------------- cancellation


async def test_cancelling_a_queued_waiter_removes_it_without_leaking() -> None:
    bottleneck, _, clock = make(max_concurrent=1)
    holder = acquire_now(bottleneck)
    waiter = start(bottleneck)
    await settle()
    assert bottleneck.queued == 1

    waiter.cancel()
    await settle()
    assert waiter.cancelled()
    assert (bottleneck.running, bottleneck.queued) == (1, 0)
    assert asyncio.all_tasks() == {asyncio.current_task()}  # its queue timer is gone too

    clock.advance(100)
    await settle()
    holder.release()
    snapshot = bottleneck.snapshot()
    assert (snapshot["running"], snapshot["queued"]) == (0, 0)
    assert snapshot["totals"]["admitted"] == snapshot["totals"]["completed"] == 1
    assert snapshot["totals"]["rejected"]["queue_timeout"] == 0


async def test_a_waiter_cancelled_after_being_granted_passes_the_slot_on() -> None:
    bottleneck, _, clock = make(max_concurrent=1)
    holder = acquire_now(bottleneck)
    granted = start(bottleneck)
    await settle()
    next_in_line = start(bottleneck)
    await settle()

    clock.advance(4)
    holder.release()
    assert (bottleneck.running, bottleneck.queued) == (1, 1)  # `granted` holds it, not resumed
    granted.cancel()
    await settle()

    assert granted.cancelled()
    assert next_in_line.done() and (bottleneck.running, bottleneck.queued) == (1, 0)
    # The abandoned permit did no work: it is not a (0 s) service-time sample.
    assert bottleneck.snapshot()["serviceTimeS"] == 4.0
    (await finished(next_in_line)).release()
    assert bottleneck.running == 0
    assert bottleneck.snapshot()["totals"]["admitted"] == 3


async def test_a_waiter_cancelled_in_the_step_its_slot_frees_is_skipped() -> None:
    bottleneck, _, _ = make(max_concurrent=1)
    holder = acquire_now(bottleneck)
    cancelled = start(bottleneck)
    await settle()
    next_in_line = start(bottleneck)
    await settle()

    cancelled.cancel()  # its task has not run its cleanup yet ...
    holder.release()  # ... when the slot frees
    await settle()

    assert cancelled.cancelled()
    assert next_in_line.done() and (bottleneck.running, bottleneck.queued) == (1, 0)
    (await finished(next_in_line)).release()
    assert bottleneck.running == 0


async def test_timeout_and_cancellation_in_the_same_step() -> None:
    bottleneck, _, clock = make(max_concurrent=1, queue_timeout_s=30)
    holder = acquire_now(bottleneck)
    waiter = start(bottleneck)
    await settle()

    clock.advance(30)  # the timer is due ...
    waiter.cancel()  # ... and the caller leaves before it runs
    await settle()

    assert waiter.cancelled()
    assert (bottleneck.running, bottleneck.queued) == (1, 0)
    assert bottleneck.snapshot()["totals"]["rejected"]["queue_timeout"] == 0
    holder.release()
    assert bottleneck.running == 0


async def test_an_outer_timeout_on_acquire_leaves_the_queue() -> None:
    bottleneck, _, _ = make(max_concurrent=1)
    holder = acquire_now(bottleneck)

    async def give_up_soon() -> None:
        async with asyncio.timeout(0):
            await bottleneck.acquire()

    with pytest.raises(TimeoutError):
        await give_up_soon()
    await settle()
    assert (bottleneck.running, bottleneck.queued) == (1, 0)
    holder.release()


# ---------------------------------------------------------------------------- release


async def test_release_is_idempotent() -> None:
    bottleneck, _, _ = make(max_concurrent=2)
    permit = acquire_now(bottleneck)
    other = acquire_now(bottleneck)
    permit.release()
    permit.release()
    async with permit:
        pass  # a third release through the context manager
    assert permit.released and not other.released
    assert bottleneck.running == 1
    assert bottleneck.snapshot()["totals"]["completed"] == 1
    other.release()


async def test_context_manager_releases_on_error() -> None:
    bottleneck, _, _ = make(max_concurrent=1)
    with pytest.raises(ValueError, match="boom"):
        async with acquire_now(bottleneck):
            raise ValueError("boom")
    assert bottleneck.running == 0


# ---------------------------------------------------------------------------- runtime changes


async def test_raising_max_concurrent_admits_waiters_at_once() -> None:
    bottleneck, flags, _ = make(max_concurrent=2)
    held = [acquire_now(bottleneck) for _ in range(2)]
    waiters = [start(bottleneck) for _ in range(4)]
    await settle()
    assert (bottleneck.running, bottleneck.queued) == (2, 4)

    flags.set({"max_concurrent": 5})
    assert (bottleneck.running, bottleneck.queued) == (5, 1)  # synchronously, on the change
    await settle()
    assert [task.done() for task in waiters] == [True, True, True, False]

    for permit in held:
        permit.release()
    for task in waiters:
        (await finished(task)).release()
    assert bottleneck.running == 0


async def test_lowering_max_concurrent_lets_running_requests_finish_first() -> None:
    bottleneck, flags, _ = make(max_concurrent=4)
    held = [acquire_now(bottleneck) for _ in range(4)]
    waiters = [start(bottleneck) for _ in range(3)]
    await settle()

    flags.set({"max_concurrent": 2})
    observed = []
    for permit in held:
        permit.release()
        await settle()
        observed.append((bottleneck.running, bottleneck.queued))
    # 3 and 2 running: nothing admitted (not below 2); at 1 running the first waiter goes in.
    assert observed == [(3, 3), (2, 3), (2, 2), (2, 1)]

    newcomer = start(bottleneck)
    await settle()
    assert not newcomer.done() and bottleneck.queued == 2  # new arrivals queue behind
    for task in [*waiters, newcomer]:  # each release hands the slot to the next in line
        (await finished(task)).release()
        await settle()
    assert (bottleneck.running, bottleneck.queued) == (0, 0)


async def test_queue_cap_changes_apply_to_the_next_arrival() -> None:
    bottleneck, flags, _ = make(max_concurrent=1, max_queue=1)
    holder = acquire_now(bottleneck)
    waiters = [start(bottleneck)]
    await settle()
    with pytest.raises(AdmissionRejected, match=r"queue full \(1/1\)"):
        acquire_now(bottleneck)

    flags.set({"max_queue": 3})
    waiters += [start(bottleneck), start(bottleneck)]
    await settle()
    assert bottleneck.queued == 3

    flags.set({"max_queue": 2})  # those already waiting keep their place
    assert bottleneck.queued == 3
    with pytest.raises(AdmissionRejected, match="queue full"):
        acquire_now(bottleneck)
    await cancel_all(*waiters)
    holder.release()


async def test_an_adaptive_limit_that_rose_is_applied_queue_first() -> None:
    class MovableLimit:
        value = 1

        def current(self) -> int:
            return self.value

    limit = MovableLimit()
    settings = Settings(enable_bottleneck=True, max_concurrent=5, max_queue=20)
    bottleneck = Bottleneck(FlagStore(settings), FakeClock(autoadvance=False), limit=limit)
    holder = acquire_now(bottleneck)
    waiter = start(bottleneck)
    await settle()

    limit.value = 2  # no flag change, so nobody was told
    newcomer = start(bottleneck)
    await settle()

    assert waiter.done() and not newcomer.done()  # the queue is served before the newcomer
    for permit in (holder, await finished(waiter)):
        permit.release()
    (await finished(newcomer)).release()
    assert bottleneck.running == 0


# ---------------------------------------------------------------------------- enable flag


async def test_disabled_admission_is_a_no_op(metrics: Metrics) -> None:
    bottleneck, _, _ = make(max_concurrent=1, max_queue=0, enabled=False, metrics=metrics)
    permits = [acquire_now(bottleneck) for _ in range(50)]

    assert not any(permit.counted for permit in permits)
    assert (bottleneck.running, bottleneck.queued) == (0, 0)
    for permit in permits:
        permit.release()
    assert bottleneck.running == 0
    totals = bottleneck.snapshot()["totals"]
    assert totals["admitted"] == totals["completed"] == 0
    assert sample(metrics, "bottleneck_running_total", OP) == 0
    assert sample(metrics, "bottleneck_queue_wait_seconds_count") == 0


async def test_switching_the_flag_off_lets_waiters_run_and_on_again_counts() -> None:
    bottleneck, flags, _ = make(max_concurrent=1)
    holder = acquire_now(bottleneck)
    waiters = [start(bottleneck) for _ in range(3)]
    await settle()

    flags.set({"enable_bottleneck": False})
    await settle()
    released = [await finished(task) for task in waiters]
    assert not any(permit.counted for permit in released)
    assert (bottleneck.running, bottleneck.queued) == (1, 0)  # the holder still counts

    flags.set({"enable_bottleneck": True})
    holder.release()
    for permit in released:
        permit.release()
    assert bottleneck.running == 0
    again = acquire_now(bottleneck)
    assert again.counted and bottleneck.running == 1
    again.release()


# ---------------------------------------------------------------------------- draining


async def test_draining_rejects_new_arrivals_and_finishes_the_rest() -> None:
    bottleneck, _, clock = make(max_concurrent=1)
    holder = acquire_now(bottleneck)
    waiter = start(bottleneck)
    await settle()

    bottleneck.start_draining()
    with pytest.raises(AdmissionRejected) as rejected:
        acquire_now(bottleneck)
    assert (rejected.value.code, rejected.value.status) == ("DRAINING", 503)
    assert rejected.value.retry_after_s is None

    busy = asyncio.create_task(bottleneck.drained(timeout_s=5))
    await settle()
    clock.advance(5)
    assert await finished(busy) is False  # still busy after 5 s
    drained = asyncio.create_task(bottleneck.drained())
    await settle()
    holder.release()  # the queued request is still served
    await settle()
    permit = await finished(waiter)
    assert not drained.done()
    permit.release()
    assert await finished(drained) is True
    assert await bottleneck.drained(timeout_s=0) is True
    assert bottleneck.snapshot()["totals"]["rejected"]["draining"] == 1


async def test_drained_times_out_on_the_clock() -> None:
    bottleneck, _, clock = make(max_concurrent=1)
    permit = acquire_now(bottleneck)
    drained = asyncio.create_task(bottleneck.drained(timeout_s=10))
    await settle()
    clock.advance(9)
    await settle()
    assert not drained.done()
    clock.advance(1)
    assert await finished(drained) is False
    permit.release()


# ---------------------------------------------------------------------------- metrics and snapshot


async def test_metrics_follow_admissions_waits_and_rejections(metrics: Metrics) -> None:
    bottleneck, _, clock = make(max_concurrent=1, max_queue=1, queue_timeout_s=10, metrics=metrics)
    metrics.admission_source = bottleneck

    first = acquire_now(bottleneck)  # admitted at once
    second = start(bottleneck)  # queued
    await settle()
    with pytest.raises(AdmissionRejected):
        acquire_now(bottleneck)  # queue full
    assert sample(metrics, "bottleneck_running") == 1
    assert sample(metrics, "bottleneck_queued") == 1

    clock.advance(4)
    first.release()  # second admitted after 4 s in the queue
    await settle()
    third = start(bottleneck)
    await settle()
    clock.advance(10)  # third times out
    await settle()
    with pytest.raises(AdmissionRejected):
        await finished(third)

    assert sample(metrics, "bottleneck_running_total", OP) == 2
    assert sample(metrics, "bottleneck_queued_total", OP) == 1
    assert sample(metrics, "bottleneck_rejected_total", {**OP, "reason": "queue_full"}) == 1
    assert sample(metrics, "bottleneck_rejected_total", {**OP, "reason": "queue_timeout"}) == 1
    assert sample(metrics, "bottleneck_rejected_total", {**OP, "reason": "draining"}) == 0
    assert sample(metrics, "bottleneck_queue_wait_seconds_count") == 2
    assert sample(metrics, "bottleneck_queue_wait_seconds_sum") == 4.0
    assert sample(metrics, "bottleneck_queue_wait_seconds_bucket", {"le": "2.5"}) == 1
    assert sample(metrics, "bottleneck_queue_wait_seconds_bucket", {"le": "5.0"}) == 2

    (await finished(second)).release()
    assert sample(metrics, "bottleneck_running") == 0
    assert sample(metrics, "bottleneck_queued") == 0


async def test_snapshot_for_the_admin_route() -> None:
    bottleneck, _, clock = make(max_concurrent=2, max_queue=3, queue_timeout_s=7.5)
    permit = acquire_now(bottleneck)
    clock.advance(2)
    permit.release()
    held = [acquire_now(bottleneck) for _ in range(2)]
    waiter = start(bottleneck)
    await settle()

    assert bottleneck.snapshot() == {
        "enabled": True,
        "scope": "replica",
        "fleetAdmission": False,
        "draining": False,
        "running": 2,
        "queued": 1,
        "maxConcurrent": 2,
        "localLimit": 2,
        "maxQueue": 3,
        "queueTimeoutS": 7.5,
        "serviceTimeS": 2.0,
        "retryAfterS": 2,  # 2 s × (1 queued + 1) / 2 running
        "totals": {
            "admitted": 3,
            "queuedEver": 1,
            "completed": 1,
            "rejected": {"queue_full": 0, "queue_timeout": 0, "draining": 0},
        },
    }
    await cancel_all(waiter)
    for permit in held:
        permit.release()
