"""The circuit breaker's vocabulary and its states as objects (resilience4j's ClosedState,
OpenState, HalfOpenState, ForcedOpenState, DisabledState): what each state admits, when it
times out, and what a counted outcome turns it into. The breaker that holds them, switches
them and counts is `rom_agent.resilience.breaker`.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from rom_agent.config import Settings

if TYPE_CHECKING:
    from rom_agent.resilience.breaker import CircuitBreaker

# While HALF_OPEN is saturated a probe is deciding right now; tell callers to come back soon
# rather than after the (much longer) probe lease.
_HALF_OPEN_RETRY_AFTER_S = 1.0


class State(enum.StrEnum):
    """The states the outside world sees (SPEC §4, the `circuit_breaker_state` gauge)."""

    CLOSED = "CLOSED"
    HALF_OPEN = "HALF_OPEN"
    OPEN = "OPEN"


class BreakerOpen(Exception):
    """Our own rejection: the breaker admitted no call. Never retried, never a failure."""

    def __init__(self, model: str, state: State, retry_after_s: float) -> None:
        super().__init__(f"circuit breaker for {model} is {state.value}")
        self.model = model
        self.state = state
        self.retry_after_s = retry_after_s


class Outcome(enum.StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"
    IGNORED = "ignored"


class BreakerPermit:
    """Admission of one call by a breaker. Report exactly one outcome; later reports are
    no-ops, so a `finally: permit.record_ignored()` safety net is always correct."""

    __slots__ = ("_breaker", "_generation", "_probe", "_settled")

    def __init__(self, breaker: CircuitBreaker | None, generation: int, probe: int) -> None:
        self._breaker = breaker  # None: the breaker is disabled, nothing is recorded
        self._generation = generation
        self._probe = probe  # lease id in HALF_OPEN, 0 otherwise
        self._settled = False

    def record_success(self) -> None:
        self._settle(Outcome.SUCCESS)

    def record_failure(self) -> None:
        self._settle(Outcome.FAILURE)

    def record_ignored(self) -> None:
        self._settle(Outcome.IGNORED)

    def _settle(self, outcome: Outcome) -> None:
        if not self._settled and self._breaker is not None:
            self._settled = True
            self._breaker._on_result(self._generation, self._probe, outcome)


# What a disabled breaker hands out: nothing is consulted or updated.
NOOP_PERMIT = BreakerPermit(None, 0, 0)


# --------------------------------------------------------------------------- states


class BreakerState:
    """One state of one breaker. `reported` is what the gauge and the admin route show."""

    __slots__ = ()
    reported = State.CLOSED
    mode = "closed"
    timed = False  # has time-driven transitions (`due`): only those are refreshed on reads

    def observe(self, breaker: CircuitBreaker, now: float, settings: Settings) -> State:
        """The state as of `now`, without changing anything."""
        return self.reported

    def due(self, breaker: CircuitBreaker, now: float, settings: Settings) -> BreakerState | None:
        """The state this one must turn into as of `now`, if any (time-driven transitions)."""
        return None

    def admit(self, breaker: CircuitBreaker, now: float, settings: Settings) -> BreakerPermit:
        raise breaker._reject(self.reported, self.retry_after_s(breaker, now, settings))

    def retry_after_s(self, breaker: CircuitBreaker, now: float, settings: Settings) -> float:
        return 0.0

    def on_result(self, breaker: CircuitBreaker, outcome: Outcome, settings: Settings) -> None:
        """A counted outcome of a call admitted in this state (same generation)."""


class ClosedState(BreakerState):
    __slots__ = ("failures",)
    reported = State.CLOSED
    mode = "closed"

    def __init__(self) -> None:
        self.failures = 0  # consecutive counted failures

    def admit(self, breaker: CircuitBreaker, now: float, settings: Settings) -> BreakerPermit:
        return BreakerPermit(breaker, breaker._generation, 0)

    def on_result(self, breaker: CircuitBreaker, outcome: Outcome, settings: Settings) -> None:
        if outcome is Outcome.SUCCESS:
            self.failures = 0
            return
        self.failures += 1
        if self.failures >= settings.circuit_breaker_threshold:
            breaker._become(OpenState(breaker.now()), f"{self.failures} consecutive failures")


class OpenState(BreakerState):
    __slots__ = ("opened_at",)
    reported = State.OPEN
    mode = "open"
    timed = True

    def __init__(self, opened_at: float) -> None:
        self.opened_at = opened_at

    def _cooled(self, now: float, settings: Settings) -> bool:
        return now >= self.opened_at + settings.circuit_breaker_cooldown_s

    def observe(self, breaker: CircuitBreaker, now: float, settings: Settings) -> State:
        return State.HALF_OPEN if self._cooled(now, settings) else State.OPEN

    def due(self, breaker: CircuitBreaker, now: float, settings: Settings) -> BreakerState | None:
        return HalfOpenState() if self._cooled(now, settings) else None

    def retry_after_s(self, breaker: CircuitBreaker, now: float, settings: Settings) -> float:
        return max(0.0, self.opened_at + settings.circuit_breaker_cooldown_s - now)


class HalfOpenState(BreakerState):
    __slots__ = ("probes", "seq")
    reported = State.HALF_OPEN
    mode = "half_open"

    def __init__(self) -> None:
        self.probes: dict[int, float] = {}  # leases: id -> issued at
        self.seq = 0

    def has_slot(self, now: float, settings: Settings) -> bool:
        if self.probes:
            # A probe that has not reported within a whole attempt timeout is hung: free it.
            oldest_allowed = now - settings.attempt_timeout_s
            for probe, issued_at in list(self.probes.items()):
                if issued_at <= oldest_allowed:
                    del self.probes[probe]
        return len(self.probes) < settings.circuit_breaker_half_open_max_calls

    def admit(self, breaker: CircuitBreaker, now: float, settings: Settings) -> BreakerPermit:
        if not self.has_slot(now, settings):
            raise breaker._reject(State.HALF_OPEN, _HALF_OPEN_RETRY_AFTER_S)
        self.seq += 1
        self.probes[self.seq] = now
        return BreakerPermit(breaker, breaker._generation, self.seq)

    def retry_after_s(self, breaker: CircuitBreaker, now: float, settings: Settings) -> float:
        return 0.0 if self.has_slot(now, settings) else _HALF_OPEN_RETRY_AFTER_S

    def on_result(self, breaker: CircuitBreaker, outcome: Outcome, settings: Settings) -> None:
        if outcome is Outcome.SUCCESS:
            breaker._become(ClosedState(), "probe succeeded")
        else:
            breaker._become(OpenState(breaker.now()), "probe failed")


class ForcedOpenState(BreakerState):
    """Manual OPEN: no cooldown, no probes, held until closed or reset."""

    __slots__ = ()
    reported = State.OPEN
    mode = "forced_open"

    def retry_after_s(self, breaker: CircuitBreaker, now: float, settings: Settings) -> float:
        return settings.circuit_breaker_cooldown_s


class DisabledState(BreakerState):
    """ENABLE_CIRCUIT_BREAKER off: admits everything, records nothing, reports CLOSED."""

    __slots__ = ()
    reported = State.CLOSED
    mode = "disabled"

    def admit(self, breaker: CircuitBreaker, now: float, settings: Settings) -> BreakerPermit:
        return NOOP_PERMIT
