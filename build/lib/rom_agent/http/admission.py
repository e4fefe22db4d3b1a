"""Admission at the HTTP edge: take a bottleneck slot, or give up the place in the queue as
soon as the client goes away."""

from __future__ import annotations

import asyncio

from starlette.requests import Request

from rom_agent.http.errors import ApiError
from rom_agent.resilience.bottleneck import Bottleneck, Permit


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects. Call only after the body has been read: from then
    on the only message the server can deliver is `http.disconnect`."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def admit(request: Request, bottleneck: Bottleneck) -> Permit:
    """A slot for this request. Admission and rejection are immediate; only a queued request
    waits, racing its turn against the client's disconnect."""
    permit = bottleneck.try_acquire()
    if permit is not None:
        return permit
    waiter = bottleneck.enqueue()
    watching = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((waiter.future, watching), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        bottleneck.abandon(waiter)
        raise
    finally:
        watching.cancel()
    if waiter.future.done():
        return waiter.future.result()  # the permit, or AdmissionRejected (queue timeout)
    bottleneck.abandon(waiter)  # leaves the queue; a slot granted meanwhile is passed on
    # Nobody is listening any more; this answer is never delivered.
    raise ApiError(499, "CLIENT_CLOSED_REQUEST", "client disconnected while queued")
