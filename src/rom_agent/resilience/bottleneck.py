"""Admission control ("bottleneck", SPEC §5): a concurrency limit with a bounded FIFO queue.

Up to `limit` requests run; up to `MAX_QUEUE` more wait in arrival order; anything beyond is
rejected at once with `AdmissionRejected("queue_full")`. A waiter that waited `QUEUE_TIMEOUT_S`
is rejected with `queue_timeout`; after `start_draining()` new arrivals get `draining`.

Design, in the order a reader needs it:

* State is two counters and an `OrderedDict` of waiters (O(1) append, FIFO pop and removal of
  a cancelled waiter). There is no lock: every state change happens synchronously between
  awaits on the event loop thread, so the only interleavings are at `await` points.
* A freed slot is *handed over*: `running` stays the same and the head waiter's future gets
  its `Permit` in the same synchronous step, so a newcomer can never barge ahead of the queue.
  If the waiter's task is cancelled after the hand-over but before it resumes, it passes the
  slot on to the next waiter instead of leaking it (the bug class of cpython gh-90155).
* `Permit.release()` is idempotent, so "exactly once on every path" only needs a `finally`
  (or `async with`); stream ends, errors and cancellations all converge there.
* Limits are read at admission time: the concurrency limit from a `Limit` object (the seam for
  an adaptive limit later), the queue cap, timeout and the enable flag from
  `flags.current`. The bottleneck also subscribes to the flag store, so a raised limit admits
  queued waiters at once and switching the flag off lets every waiter run.
* Time comes from the injected `Clock`. A queued waiter gets a small timer task that does
  `await clock.sleep(queue_timeout_s)` and then rejects the waiter if it is still queued; the
  timer is cancelled when the waiter is admitted or leaves. With `SystemClock` that is a plain
  `asyncio.sleep`; with `FakeClock(autoadvance=False)` tests fire it with `advance()`. (With
  `autoadvance=True` every sleep ends at once, so a queued waiter times out on the next tick.)

Retry-After for a rejection is `clamp(ceil(S × (queued + 1) / limit), 1, ceil(QUEUE_TIMEOUT_S))`
seconds, where S is an exponentially weighted moving average (alpha 0.2) of the time permits
were held (1 s before the first sample): roughly the time for the running requests to work
through the queue ahead of a retry. It is capped at the queue timeout because by then every
request queued now has started or given up, so the backlog the estimate describes is gone.

All of this is per process and single event loop; flag changes must happen on the loop thread.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rom_agent.domain.events import AdmissionDenied, AdmissionGranted
from rom_agent.resilience.admission_permits import (
    AdmissionRejected,
    FixedLimit,
    Limit,
    Permit,
    RejectReason,
    RemoteAdmission,
)

if TYPE_CHECKING:
    from rom_agent.config import Settings
    from rom_agent.domain.events import Events
    from rom_agent.flags import FlagStore
    from rom_agent.resilience.clock import Clock


_SERVICE_PRIOR_S = 1.0  # assumed service time until the first permit is released
_SERVICE_ALPHA = 0.2  # EWMA weight of the newest service-time sample


class _Waiter:
    __slots__ = ("enqueued_at", "future", "timer")

    def __init__(self, future: asyncio.Future[Permit], enqueued_at: float) -> None:
        self.future = future
        self.enqueued_at = enqueued_at
        self.timer: asyncio.Task[None] | None = None


class Bottleneck:
    """Admission control for chat requests. Knows nothing about HTTP.

    With ADMISSION_SCOPE=fleet and Redis answering, the limits are fleet-wide and admission
    goes through `remote` (see `fleet/leases.py`); permits it grants are counted here too, so
    gauges, drain and the local fallback see them. When Redis is down the local path applies
    a conservative share: `ceil(limit / last known replica count)` for both the concurrency
    limit and the queue cap — never the whole budget per replica, never unlimited.

    Construction subscribes to `flags`, so limit and enable-flag changes take effect at once.
    `running` and `queued` satisfy `instrumentation.prometheus.AdmissionGauges`.
    """

    def __init__(
        self,
        flags: FlagStore,
        clock: Clock,
        events: Events | None = None,
        *,
        limit: Limit | None = None,
    ) -> None:
        self._flags = flags
        self._clock = clock
        self._events = events
        self._limit: Limit = limit if limit is not None else FixedLimit(flags)
        self._running = 0
        # A waiter whose task was just cancelled stays here until that task runs its cleanup
        # (one loop step); `_dispatch` skips such entries.
        self._waiters: OrderedDict[_Waiter, None] = OrderedDict()
        self._draining = False
        self._idle_waiters: set[asyncio.Future[None]] = set()
        self._service_ewma_s: float | None = None
        # Totals for the admin route; Prometheus counters live in `PrometheusMetrics`.
        self._admitted = 0
        self._queued_ever = 0
        self._completed = 0
        self._rejected: dict[RejectReason, int] = {
            "queue_full": 0,
            "queue_timeout": 0,
            "draining": 0,
        }
        self.remote: RemoteAdmission | None = None
        self.replica_count: Callable[[], int] = lambda: 1
        flags.subscribe(self._on_settings)

    # ------------------------------------------------------------------ fleet scope

    def _fleet_scope(self, settings: Settings) -> bool:
        return settings.admission_scope == "fleet" and self.remote is not None

    def remote_gate(self) -> RemoteAdmission | None:
        """The fleet-wide admission to use for the next request, or None for the local one."""
        settings = self._flags.current
        remote = self.remote
        if (
            remote is None
            or self._draining
            or not settings.enable_bottleneck
            or settings.admission_scope != "fleet"
            or not remote.available
        ):
            return None
        return remote

    def _local_limit(self, settings: Settings) -> int:
        limit = self._limit.current()
        if self._fleet_scope(settings):
            return math.ceil(limit / max(1, self.replica_count()))
        return limit

    def _queue_cap(self, settings: Settings) -> int:
        if self._fleet_scope(settings):
            return math.ceil(settings.max_queue / max(1, self.replica_count()))
        return settings.max_queue

    def admit_remote(self, lease: str, waited_s: float, queued: bool) -> Permit:
        """A permit for a slot granted fleet-wide (counted here like a local one)."""
        permit = self._admit(self._clock.now(), waited_s=waited_s, queued=queued)
        permit.lease = lease
        return permit

    def reject_remote(
        self, reason: RejectReason, message: str, *, queued: int, limit: int
    ) -> AdmissionRejected:
        """Count a fleet-wide rejection; its Retry-After uses the fleet's numbers."""
        self._rejected[reason] += 1
        if self._events is not None:
            self._events.emit(AdmissionDenied, reason)
        return AdmissionRejected(reason, message, self._retry_after(queued, limit))

    def notify_idle(self) -> None:
        self._notify_if_idle()

    # ------------------------------------------------------------------ public API

    @property
    def running(self) -> int:
        """Permits held, including ones handed to a waiter that has not resumed yet."""
        return self._running

    @property
    def queued(self) -> int:
        return len(self._waiters) + (self.remote.queued if self.remote is not None else 0)

    @property
    def draining(self) -> bool:
        return self._draining

    async def acquire(self) -> Permit:
        """A slot to run in, waiting in FIFO order if needed; `AdmissionRejected` otherwise.

        Admission and rejection happen without suspending; only a queued caller awaits.
        """
        permit = self.try_acquire()
        if permit is not None:
            return permit
        return await self.wait()

    def try_acquire(self) -> Permit | None:
        """Admit or reject at once; None means "room in the queue: call `wait()`".

        Split from `acquire()` so the HTTP layer can race only the queued case against a
        client disconnect, keeping the common path free of extra tasks.
        """
        settings = self._flags.current
        if self._draining:  # shutting down rejects whatever the flag says
            raise self._reject("draining", settings)
        if not settings.enable_bottleneck:
            return Permit(None)
        limit = self._local_limit(settings)
        if self._running < limit:
            if self._waiters:
                self._dispatch()  # the limit rose since the last release: serve the queue first
            if self._running < limit:
                return self._admit(self._clock.now(), waited_s=0.0, queued=False)
        if len(self._waiters) >= self._queue_cap(settings):
            raise self._reject("queue_full", settings)
        return None

    def retry_after_s(self) -> int:
        """Whole seconds a rejected client should wait; see the module docstring."""
        return self._retry_after(len(self._waiters), self._local_limit(self._flags.current))

    def _retry_after(self, queued: int, limit: int) -> int:
        service_s = self._service_ewma_s if self._service_ewma_s is not None else _SERVICE_PRIOR_S
        estimate = service_s * (queued + 1) / max(1, limit)
        cap = math.ceil(self._flags.current.queue_timeout_s)
        return max(1, min(math.ceil(estimate), cap))

    def start_draining(self) -> None:
        """Reject new arrivals from now on; queued and running requests still finish.

        Like everything here, this only acts while admission control is on: with the flag off
        the bottleneck is inert and shutdown is left to the server.
        """
        self._draining = True

    async def drained(self, timeout_s: float | None = None) -> bool:
        """Wait until nothing runs or waits. False if `timeout_s` (clock time) passed first."""
        if self._is_idle():
            return True
        idle: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._idle_waiters.add(idle)
        try:
            if timeout_s is None:
                await idle
                return True
            timer = asyncio.ensure_future(self._clock.sleep(timeout_s))
            try:
                await asyncio.wait((idle, timer), return_when=asyncio.FIRST_COMPLETED)
            finally:
                timer.cancel()
            return idle.done()
        finally:
            self._idle_waiters.discard(idle)
            idle.cancel()

    def snapshot(self) -> dict[str, Any]:
        """State for `GET /admin/bottleneck`."""
        settings = self._flags.current
        return {
            "enabled": settings.enable_bottleneck,
            "scope": settings.admission_scope,
            "fleetAdmission": self.remote_gate() is not None,
            "draining": self._draining,
            "running": self._running,
            "queued": self.queued,
            "maxConcurrent": self._limit.current(),
            "localLimit": self._local_limit(settings),
            "maxQueue": settings.max_queue,
            "queueTimeoutS": settings.queue_timeout_s,
            "serviceTimeS": self._service_ewma_s,
            "retryAfterS": self.retry_after_s(),
            "totals": {
                "admitted": self._admitted,
                "queuedEver": self._queued_ever,
                "completed": self._completed,
                "rejected": dict(self._rejected),
            },
        }

    # ------------------------------------------------------------------ state changes

    def _admit(self, now: float, *, waited_s: float, queued: bool) -> Permit:
        self._running += 1
        self._admitted += 1
        if self._events is not None:
            self._events.emit(AdmissionGranted, waited_s, queued)
        return Permit(self, now, waited_s)

    def _reject(self, reason: RejectReason, settings: Settings) -> AdmissionRejected:
        """Count a rejection and build its exception (the caller raises it)."""
        self._rejected[reason] += 1
        if self._events is not None:
            self._events.emit(AdmissionDenied, reason)
        if reason == "queue_full":
            # SPEC §3 wording; equal to (MAX_QUEUE/MAX_QUEUE) unless the cap was just lowered.
            message = (
                "Service temporarily unavailable: "
                f"queue full ({len(self._waiters)}/{self._queue_cap(settings)})"
            )
        elif reason == "queue_timeout":
            message = (
                "Service temporarily unavailable: "
                f"no slot within the queue timeout ({settings.queue_timeout_s:g}s)"
            )
        else:
            return AdmissionRejected(reason, "Service is shutting down", None)
        return AdmissionRejected(reason, message, self.retry_after_s())

    def enqueue(self) -> _Waiter:
        """Take a place in the queue now (after `try_acquire()` returned None).

        The place is taken synchronously, so the queue cap holds however many requests arrive
        in one loop step. Await `waiter.future` for the permit (or AdmissionRejected on
        timeout); a caller that stops waiting must call `abandon(waiter)`.
        """
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), self._clock.now())
        self._waiters[waiter] = None
        self._queued_ever += 1
        waiter.timer = loop.create_task(
            self._expire_after(waiter, self._flags.current.queue_timeout_s)
        )
        return waiter

    async def wait(self) -> Permit:
        """Queue for a slot (after `try_acquire()` returned None) and wait for it."""
        waiter = self.enqueue()
        try:
            return await waiter.future
        except asyncio.CancelledError:
            self.abandon(waiter)
            raise

    def abandon(self, waiter: _Waiter) -> None:
        """The waiter gave up: leave the queue, or pass on a slot already granted."""
        if waiter.timer is not None:
            waiter.timer.cancel()
        future = waiter.future
        if not future.done():
            future.cancel()
        if future.cancelled():
            self._waiters.pop(waiter, None)
            self._notify_if_idle()
        elif future.exception() is None:
            # Granted, but the caller is gone before it could run: nothing was served, so
            # this is not a service-time sample.
            future.result()._release(measured=False)
        # else: it timed out in the same loop step; it holds nothing.

    async def _expire_after(self, waiter: _Waiter, timeout_s: float) -> None:
        await self._clock.sleep(timeout_s)
        if waiter.future.done():  # admitted, cancelled or let through meanwhile
            return
        self._waiters.pop(waiter, None)
        waiter.future.set_exception(self._reject("queue_timeout", self._flags.current))
        self._notify_if_idle()

    def _on_release(self, permit: Permit, *, measured: bool) -> None:
        now = self._clock.now()
        if permit.lease is not None and self.remote is not None:
            self.remote.release_soon(permit.lease)
        self._running -= 1
        self._completed += 1
        if measured:
            sample = now - permit._admitted_at
            if self._service_ewma_s is None:
                self._service_ewma_s = sample
            else:
                self._service_ewma_s += _SERVICE_ALPHA * (sample - self._service_ewma_s)
        self._dispatch()

    def _on_settings(self, settings: Settings) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand free slots to the head of the queue; with the flag off, let every waiter run."""
        if self._waiters:
            enabled = self._flags.current.enable_bottleneck
            limit = self._local_limit(self._flags.current)
            now = self._clock.now()
            while self._waiters and (self._running < limit or not enabled):
                waiter, _ = self._waiters.popitem(last=False)
                if waiter.future.done():  # cancelled; its task has not cleaned up yet
                    continue
                if waiter.timer is not None:
                    waiter.timer.cancel()
                if enabled:
                    permit = self._admit(now, waited_s=now - waiter.enqueued_at, queued=True)
                else:
                    permit = Permit(None)  # admission control was switched off: just run
                waiter.future.set_result(permit)
        self._notify_if_idle()

    def _is_idle(self) -> bool:
        return self._running == 0 and self.queued == 0

    def _notify_if_idle(self) -> None:
        if self._idle_waiters and self._is_idle():
            for idle in self._idle_waiters:
                if not idle.done():
                    idle.set_result(None)
