"""What admission control hands out and plugs into (SPEC §5): the rejection, the `Permit` an
admitted request holds, the `Limit` seam and the fleet-wide `RemoteAdmission` seam. The
bottleneck that queues and dispatches is `rom_agent.resilience.bottleneck`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from types import TracebackType

    from rom_agent.flags import FlagStore
    from rom_agent.resilience.bottleneck import Bottleneck

RejectReason = Literal["queue_full", "queue_timeout", "draining"]


class AdmissionRejected(Exception):
    """The request was not admitted. `code` is `reason` upper-cased (`QUEUE_FULL`, ...)."""

    status = 503  # every admission rejection is "unavailable, try later" (SPEC §3)

    def __init__(self, reason: RejectReason, message: str, retry_after_s: int | None) -> None:
        super().__init__(message)
        self.reason: RejectReason = reason
        self.code = reason.upper()
        self.message = message
        self.retry_after_s = retry_after_s  # whole seconds ≥ 1, or None (draining)


class Limit(Protocol):
    """How many requests may run at once, asked at every admission.

    An adaptive limit (AIMD, Gradient2) can implement this later without an API change.
    """

    def current(self) -> int: ...


class FixedLimit:
    """`MAX_CONCURRENT` from the flag store, so a runtime change applies to the next admission."""

    __slots__ = ("_flags",)

    def __init__(self, flags: FlagStore) -> None:
        self._flags = flags

    def current(self) -> int:
        return self._flags.current.max_concurrent


class Permit:
    """One admitted request's slot. Release it exactly once — extra releases do nothing.

    Also an async context manager: `async with await bottleneck.acquire(): ...`.
    """

    __slots__ = ("_admitted_at", "_owner", "_released", "lease", "waited_s")

    def __init__(
        self,
        owner: Bottleneck | None,
        admitted_at: float = 0.0,
        waited_s: float = 0.0,
        lease: str | None = None,
    ) -> None:
        self._owner = owner  # None: admission control was off, nothing to give back
        self._admitted_at = admitted_at
        self._released = False
        self.waited_s = waited_s
        self.lease = lease  # fleet scope: the Redis lease this permit holds

    @property
    def counted(self) -> bool:
        """False for the no-op permit handed out while admission control is off."""
        return self._owner is not None

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        self._release(measured=True)

    def _release(self, *, measured: bool) -> None:
        if self._released:
            return
        self._released = True
        if self._owner is not None:
            self._owner._on_release(self, measured=measured)

    async def __aenter__(self) -> Permit:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class RemoteAdmission(Protocol):
    """The fleet-wide side (`fleet.leases.FleetAdmission`), attached when Redis is configured."""

    @property
    def available(self) -> bool: ...

    @property
    def queued(self) -> int: ...

    def release_soon(self, lease: str) -> None: ...
