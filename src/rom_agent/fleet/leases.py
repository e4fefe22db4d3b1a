"""Fleet-wide admission: MAX_CONCURRENT running and MAX_QUEUE queued across every replica.

State lives in Redis, changed only by Lua scripts (atomic; in `fleet/lease_scripts.py`):

* `<p>adm:running` — sorted set, lease id → expiry (ms, Redis clock);
* `<p>adm:queue` — sorted set, lease id → arrival sequence number (FIFO order);
* `<p>adm:qexp` — sorted set, queued lease id → expiry;
* `<p>adm:seq` — the sequence counter.

Every script first drops expired leases (a replica killed with `kill -9` stops renewing, so its
slots come back within the lease TTL), then moves queue heads into free running slots and
PUBLISHes the promoted ids on the fleet channel; the replica owning a promoted waiter wakes it.
Nothing polls per waiter: each replica renews all its leases in one call every TTL/3, and that
call also reports promotions whose message was lost (pub/sub is lossy).

Request path cost: one script call to admit (or queue, or reject); the release is sent after
the response, off the request's path. If that call fails or times out, the caller falls back to
local admission with a conservative share (see `Bottleneck`; `SharedState` decides when Redis
counts as down). The call carries a deadline on Redis's clock: run later than that (Redis
resuming after a stall runs every buffered call), it takes nothing, so the fallen-back requests
leave no stranded leases queued ahead of the fleet's next ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rom_agent.fleet.lease_scripts import ACQUIRE, RELEASE, RENEW
from rom_agent.fleet.shared_state import SharedState, SharedStateDown
from rom_agent.logs import get_logger
from rom_agent.resilience.admission_permits import AdmissionRejected, Permit

if TYPE_CHECKING:
    from rom_agent.flags import FlagStore
    from rom_agent.resilience.bottleneck import Bottleneck
    from rom_agent.resilience.clock import Clock

log = get_logger("rom_agent.fleet.admission")

WARM_CONNECTIONS = 8

TOO_LATE = -2  # ACQUIRE's verdict for a call that reached Redis after its caller gave up


@dataclass(eq=False, slots=True)
class FleetWaiter:
    lease: str
    future: asyncio.Future[Permit]
    enqueued_at: float
    timer: asyncio.Task[None] | None = field(default=None)


class FleetAdmission:
    """The Redis side of `Bottleneck` when ADMISSION_SCOPE=fleet."""

    def __init__(
        self,
        shared: SharedState,
        replica_id: str,
        flags: FlagStore,
        clock: Clock,
        *,
        lease_ttl_s: float,
    ) -> None:
        self._shared = shared
        self._replica_id = replica_id
        self._flags = flags
        self._clock = clock
        self._ttl_ms = int(lease_ttl_s * 1000)
        self._ids = itertools.count(1)
        self._keys = [shared.key("adm", name) for name in ("running", "queue", "qexp", "seq")]
        self._channel = shared.key("events")
        self._acquire = shared.client.register_script(ACQUIRE)
        self._release = shared.client.register_script(RELEASE)
        self._renew = shared.client.register_script(RENEW)
        self._held: set[str] = set()  # running leases of this replica
        self._unreleased: set[str] = set()  # given back while Redis did not answer
        self._prepared = False
        self._waiters: dict[str, FleetWaiter] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._renewer: asyncio.Task[None] | None = None
        self.bottleneck: Bottleneck | None = None
        self.last_counts = (0, 0)  # fleet-wide (running, queued) at the last script call
        shared.on_change(self._on_shared_state)

    def _on_shared_state(self, up: bool) -> None:
        if up and self._unreleased:  # Redis is back: return the stranded slots at once
            task = asyncio.get_running_loop().create_task(self._release_now(list(self._unreleased)))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ state

    @property
    def available(self) -> bool:
        return self._shared.up

    @property
    def held(self) -> int:
        return len(self._held)

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def lease_ttl_s(self) -> float:
        return self._ttl_ms / 1000

    # ------------------------------------------------------------------ admission

    async def try_acquire(
        self, admit: Callable[[str, float, bool], Permit]
    ) -> Permit | FleetWaiter | None:
        """One script call. A permit (made by `admit`), a waiter to await, or None when Redis
        did not answer (the caller falls back to local admission). AdmissionRejected when the
        fleet's queue is full."""
        settings = self._flags.current
        lease = f"{self._replica_id}:{next(self._ids)}"
        args: list[str | int] = [
            self._ttl_ms,
            settings.max_concurrent,
            settings.max_queue,
            self._channel,
            lease,
            self._shared.deadline_ms(),
        ]
        keys = self._keys
        try:
            result = await self._shared.call(
                "admission",
                lambda _: self._acquire(keys=keys, args=args),
            )
        except SharedStateDown as down:
            if down.sent:
                # A timeout does not say whether the script ran: give the lease back in case
                # it did (if Redis is really down, it expires within the TTL anyway).
                self.release_soon(lease)
            return None
        verdict, running, queued = (int(x) for x in result)
        if verdict == TOO_LATE:  # our estimate of Redis's clock was off: nothing was taken
            self._shared.forget_clock()
            self._shared.count_error("admission")
            return None
        self.last_counts = (running, queued)
        if verdict == 1:
            self._held.add(lease)
            return admit(lease, 0.0, False)
        if verdict == 0:
            loop = asyncio.get_running_loop()
            waiter = FleetWaiter(lease, loop.create_future(), self._clock.now())
            self._waiters[lease] = waiter
            waiter.timer = loop.create_task(self._expire_after(waiter, settings.queue_timeout_s))
            return waiter
        raise self._full(queued, settings.max_queue, settings.max_concurrent)

    def _full(self, queued: int, max_queue: int, limit: int) -> AdmissionRejected:
        assert self.bottleneck is not None
        return self.bottleneck.reject_remote(
            "queue_full",
            f"Service temporarily unavailable: queue full ({queued}/{max_queue})",
            queued=queued,
            limit=limit,
        )

    def abandon(self, waiter: FleetWaiter) -> None:
        """The caller stopped waiting: give the place (or a slot granted meanwhile) back."""
        if waiter.timer is not None:
            waiter.timer.cancel()
        self._waiters.pop(waiter.lease, None)
        future = waiter.future
        if not future.done():
            future.cancel()
            self.release_soon(waiter.lease)
        elif not future.cancelled() and future.exception() is None:
            future.result()._release(measured=False)

    async def _expire_after(self, waiter: FleetWaiter, timeout_s: float) -> None:
        await self._clock.sleep(timeout_s)
        if waiter.future.done():
            return
        self._waiters.pop(waiter.lease, None)
        self.release_soon(waiter.lease)  # if it was promoted just now, that slot moves on
        assert self.bottleneck is not None
        settings = self._flags.current
        waiter.future.set_exception(
            self.bottleneck.reject_remote(
                "queue_timeout",
                "Service temporarily unavailable: "
                f"no slot within the queue timeout ({settings.queue_timeout_s:g}s)",
                queued=self.last_counts[1],
                limit=settings.max_concurrent,
            )
        )

    def on_promoted(self, event: dict[str, Any]) -> None:
        """Fleet channel handler: wake our waiters whose lease now runs."""
        for lease in event.get("promoted", ()):
            self._wake(str(lease))

    def _wake(self, lease: str) -> None:
        waiter = self._waiters.pop(lease, None)
        if waiter is None or waiter.future.done():
            return
        if waiter.timer is not None:
            waiter.timer.cancel()
        self._held.add(lease)
        assert self.bottleneck is not None
        waited = self._clock.now() - waiter.enqueued_at
        waiter.future.set_result(self.bottleneck.admit_remote(lease, waited, True))

    # ------------------------------------------------------------------ release and renewal

    def release_soon(self, lease: str) -> None:
        """Give a lease back, off the request's path (an answer is not delayed by Redis)."""
        self._held.discard(lease)
        task = asyncio.get_running_loop().create_task(self._release_now([lease]))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _release_now(self, leases: list[str]) -> None:
        settings = self._flags.current
        args: list[str | int] = [self._ttl_ms, settings.max_concurrent, self._channel, *leases]
        keys = self._keys
        try:
            result = await self._shared.call(
                "release", lambda _: self._release(keys=keys, args=args), background=True
            )
        except SharedStateDown:
            # Sent again by the renewal loop once Redis answers: waiting for the TTL instead
            # would keep those slots from the fleet for up to a whole TTL after a stall.
            self._unreleased.update(leases)
            return
        self._unreleased.difference_update(leases)
        self.last_counts = (int(result[0]), int(result[1]))

    async def renew(self) -> None:
        """Extend every lease of this replica; wake waiters whose promotion message was lost."""
        leases = [*self._held, *self._waiters]
        settings = self._flags.current
        args: list[str | int] = [self._ttl_ms, settings.max_concurrent, self._channel, *leases]
        keys = self._keys
        states = await self._shared.call(
            "renew", lambda _: self._renew(keys=keys, args=args), background=True
        )
        for lease, state in zip(leases, states, strict=True):
            if state in (b"r", "r") and lease in self._waiters:
                self._wake(lease)

    def start(self) -> None:
        self._renewer = asyncio.get_running_loop().create_task(self._renew_loop())

    async def _prepare(self) -> None:
        """Before the first request: cache the scripts in Redis (else its EVALSHA misses) and
        open `WARM_CONNECTIONS` pooled connections. A burst would otherwise open them all at
        once on the request path, and a TCP connect plus handshake on a busy machine does not
        fit in the 20 ms bound: those requests fell back to local admission."""
        for script in (ACQUIRE, RELEASE, RENEW):

            async def load(redis: Any, text: str = script) -> None:
                await redis.script_load(text)

            await self._shared.call("script_load", load, background=True)
        await asyncio.gather(
            *(
                self._shared.call("warm", lambda r: r.ping(), background=True)
                for _ in range(WARM_CONNECTIONS)
            )
        )
        self._prepared = True

    async def _renew_loop(self) -> None:
        interval = max(0.2, self._ttl_ms / 3000)
        with contextlib.suppress(SharedStateDown):
            await self._prepare()
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(SharedStateDown):
                if not self._prepared:
                    await self._prepare()
                if self._unreleased:
                    await self._release_now(list(self._unreleased))
                if self._held or self._waiters:
                    await self.renew()

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        leases = [*self._held, *self._waiters]
        if leases:
            await self._release_now(leases)
        for task in list(self._background):
            with contextlib.suppress(Exception):
                await task

    async def counts(self) -> tuple[int, int]:
        """Fleet-wide (running, queued) now, expired leases excluded (for /admin/bottleneck)."""
        running_key, queue_key = self._keys[0], self._keys[1]

        async def read(redis: Any) -> tuple[int, int]:
            async with redis.pipeline(transaction=False) as pipe:
                pipe.zcount(running_key, "(" + str(await _now_ms(redis)), "+inf")
                pipe.zcard(queue_key)
                running, queued = await pipe.execute()
            return int(running), int(queued)

        return await self._shared.call("counts", read, background=True)


async def _now_ms(redis: Any) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + math.floor(int(micros) / 1000)
