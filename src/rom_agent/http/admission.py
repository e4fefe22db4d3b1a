"""Admission at the HTTP edge: take a bottleneck slot, or give up the place in the queue as
soon as the client goes away."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request

from rom_agent.fleet.leases import FleetAdmission, FleetWaiter
from rom_agent.http.errors import ApiError, client_closed
from rom_agent.resilience.admission_permits import Permit
from rom_agent.resilience.bottleneck import Bottleneck

T = TypeVar("T")


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects. Call only after the body has been read: from then
    on the only message the server can deliver is `http.disconnect`."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def admit(request: Request, bottleneck: Bottleneck) -> Permit:
    """A slot for this request. Admission and rejection are immediate; only a queued request
    waits, racing its turn against the client's disconnect.

    With fleet-wide admission (ADMISSION_SCOPE=fleet) that costs one Redis call; if Redis does
    not answer, the local admission with its conservative share decides instead."""
    remote = bottleneck.remote_gate()
    if remote is not None:
        assert isinstance(remote, FleetAdmission)
        outcome = await remote.try_acquire(bottleneck.admit_remote)
        if isinstance(outcome, Permit):
            return outcome
        if isinstance(outcome, FleetWaiter):
            waiter = outcome
            return await _wait(request, waiter.future, lambda: remote.abandon(waiter))
    permit = bottleneck.try_acquire()
    if permit is not None:
        return permit
    local = bottleneck.enqueue()
    return await _wait(request, local.future, lambda: bottleneck.abandon(local))


async def _wait(
    request: Request, future: asyncio.Future[Any], abandon: Callable[[], None]
) -> Permit:
    watching = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((future, watching), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        abandon()
        raise
    finally:
        watching.cancel()
    if future.done():
        permit: Permit = future.result()  # the permit, or AdmissionRejected (queue timeout)
        return permit
    abandon()  # leaves the queue; a slot granted meanwhile is passed on
    # Nobody is listening any more; this answer is never delivered.
    raise ApiError(499, "CLIENT_CLOSED_REQUEST", "client disconnected while queued")


# Answers faster than this are sent before a watcher would have seen anything; slower ones
# (real models: seconds) are watched from then on. Saves a task per fast request.
WATCH_AFTER_S = 0.05


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """`await work`, cancelled as soon as the client disconnects (499 for the logs).

    For a non-streamed answer the client is gone for good: the upstream call is cancelled, the
    admission slot freed, and the turn is not stored (a commit already under way completes).
    `work` runs in this task; a watcher task, started once the work has taken `WATCH_AFTER_S`,
    cancels it. The watcher cannot cancel anything after `work` returns: between that and
    `watcher.cancel()` there is no await.
    """
    loop = asyncio.get_running_loop()
    current = asyncio.current_task()
    assert current is not None
    gone = False
    watcher: asyncio.Task[None] | None = None

    async def watch() -> None:
        nonlocal gone
        await _disconnected(request)
        gone = True
        current.cancel()

    def start_watching() -> None:
        nonlocal watcher
        watcher = loop.create_task(watch())

    timer = loop.call_later(WATCH_AFTER_S, start_watching)
    try:
        return await work
    except asyncio.CancelledError:
        # Ours alone (not a server shutdown as well): the answer has nobody to go to.
        if gone and current.uncancel() == 0:
            raise client_closed("client disconnected before the answer") from None
        raise
    finally:
        timer.cancel()
        if watcher is not None:
            watcher.cancel()
