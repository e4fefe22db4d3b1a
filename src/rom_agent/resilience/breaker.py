"""Circuit breaker per model (SPEC §4): a consecutive-failure count breaker with leased probes.

    CLOSED ──(THRESHOLD consecutive counted failures)──▶ OPEN
    OPEN ──(COOLDOWN_S passed; evaluated on every read)──▶ HALF_OPEN
    HALF_OPEN ──(probe success)──▶ CLOSED        HALF_OPEN ──(probe failure)──▶ OPEN

Design points, each fixing a defect class of the Node original or of common libraries:

* No timer tasks. OPEN → HALF_OPEN happens lazily whenever the state is read — by a call, by
  `/admin/breakers`, or by the Prometheus collector calling `states()` at scrape time — so the
  transition is visible without traffic and is counted once, whoever observes it first.
* Every call holds a `Permit` and reports exactly one outcome: success, failure or ignored.
  Ignored outcomes (client cancellation, MODEL/REQUEST errors, our own deadline) release the
  permit without touching the count.
* Every transition bumps a generation. A permit remembers the generation it was issued in and
  its result is applied only if the breaker is still in that generation, so a late success from
  before a reopen can never close the breaker.
* HALF_OPEN probes are leases. A lease older than ATTEMPT_TIMEOUT_S frees its slot (checked
  lazily on acquire), so a hung probe cannot wedge the breaker in HALF_OPEN.
* All state changes are synchronous between awaits on one event loop: no lock, nothing held
  across the provider call. Not thread-safe by design (one loop per process).
* Configuration is read from the flag store at call time: runtime changes apply at once.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from rom_agent.config import Settings
from rom_agent.flags import FlagStore
from rom_agent.logs import get_logger
from rom_agent.metrics import Metrics
from rom_agent.providers.base import ModelRef
from rom_agent.resilience.clock import Clock

log = get_logger(__name__)

# While HALF_OPEN is saturated a probe is deciding right now; tell callers to come back soon
# rather than after the (much longer) probe lease.
_HALF_OPEN_RETRY_AFTER_S = 1.0


class State(enum.StrEnum):
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


class _Outcome(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    IGNORED = "ignored"


class Permit:
    """Admission of one call. Report exactly one outcome; later reports are no-ops, so a
    `finally: permit.record_ignored()` safety net is always correct."""

    __slots__ = ("_breaker", "_generation", "_probe", "_settled")

    def __init__(self, breaker: CircuitBreaker, generation: int, probe: int) -> None:
        self._breaker = breaker
        self._generation = generation
        self._probe = probe  # lease id in HALF_OPEN, 0 otherwise
        self._settled = False

    def record_success(self) -> None:
        self._settle(_Outcome.SUCCESS)

    def record_failure(self) -> None:
        self._settle(_Outcome.FAILURE)

    def record_ignored(self) -> None:
        self._settle(_Outcome.IGNORED)

    def _settle(self, outcome: _Outcome) -> None:
        if not self._settled:
            self._settled = True
            self._breaker._on_result(self._generation, self._probe, outcome)


class _NoopPermit:
    """What callers get with ENABLE_CIRCUIT_BREAKER off: nothing is consulted or updated."""

    __slots__ = ()

    def record_success(self) -> None:
        pass

    def record_failure(self) -> None:
        pass

    def record_ignored(self) -> None:
        pass


NOOP_PERMIT = _NoopPermit()
AnyPermit = Permit | _NoopPermit


@dataclass(slots=True)
class _Totals:
    success: int = 0
    failure: int = 0
    rejected: int = 0
    ignored: int = 0
    transitions: int = 0


class CircuitBreaker:
    """The breaker of one model. Create through `BreakerRegistry`."""

    def __init__(self, model: str, flags: FlagStore, clock: Clock, metrics: Metrics) -> None:
        self.model = model
        self._flags = flags
        self._clock = clock
        self._metrics = metrics
        self._state = State.CLOSED
        self._generation = 0
        self._failures = 0  # consecutive counted failures while CLOSED
        self._opened_at = 0.0
        self._forced = False  # manual OPEN: held until closed or reset, no cooldown
        self._probes: dict[int, float] = {}  # HALF_OPEN leases: id -> issued at
        self._probe_seq = 0
        self._changed_at = clock.now()
        self._why = ""  # why the last transition happened (shown by the console)
        self._totals = _Totals()

    # ------------------------------------------------------------------ reads

    @property
    def state(self) -> State:
        """The state now (performs a due OPEN → HALF_OPEN transition)."""
        return self._refresh(self._clock.now(), self._flags.current)

    @property
    def generation(self) -> int:
        return self._generation

    def retry_after_s(self) -> float:
        """Seconds until this breaker admits a call again (0 when it would admit one now)."""
        now = self._clock.now()
        settings = self._flags.current
        state = self._refresh(now, settings)
        if state is State.OPEN:
            if self._forced:
                return settings.circuit_breaker_cooldown_s
            return max(0.0, self._opened_at + settings.circuit_breaker_cooldown_s - now)
        if state is State.HALF_OPEN and not self._has_probe_slot(now, settings):
            return _HALF_OPEN_RETRY_AFTER_S
        return 0.0

    def snapshot(self) -> dict[str, Any]:
        now = self._clock.now()
        settings = self._flags.current
        state = self._refresh(now, settings)
        return {
            "model": self.model,
            "state": state.value,
            "forced": self._forced,
            "consecutiveFailures": self._failures,
            "threshold": settings.circuit_breaker_threshold,
            "generation": self._generation,
            "sinceChangeS": round(now - self._changed_at, 3),
            "why": self._why,
            "retryAfterS": round(self.retry_after_s(), 3),
            "halfOpenInFlight": len(self._probes),
            "totals": asdict(self._totals),
        }

    # ------------------------------------------------------------------ admission

    def acquire(self) -> Permit:
        """Admit one call or raise `BreakerOpen` (counted as rejected)."""
        now = self._clock.now()
        settings = self._flags.current
        state = self._refresh(now, settings)
        if state is State.CLOSED:
            return Permit(self, self._generation, 0)
        if state is State.HALF_OPEN and self._has_probe_slot(now, settings):
            self._probe_seq += 1
            self._probes[self._probe_seq] = now
            return Permit(self, self._generation, self._probe_seq)
        self._totals.rejected += 1
        self._metrics.breaker_outcome(self.model, "rejected")
        raise BreakerOpen(self.model, state, self.retry_after_s())

    def _has_probe_slot(self, now: float, settings: Settings) -> bool:
        if self._probes:
            # A probe that has not reported within a whole attempt timeout is hung: free it.
            oldest_allowed = now - settings.attempt_timeout_s
            for probe, issued_at in list(self._probes.items()):
                if issued_at <= oldest_allowed:
                    del self._probes[probe]
        return len(self._probes) < settings.circuit_breaker_half_open_max_calls

    # ------------------------------------------------------------------ outcomes

    def _on_result(self, generation: int, probe: int, outcome: _Outcome) -> None:
        if probe:
            self._probes.pop(probe, None)
        if outcome is _Outcome.IGNORED:
            self._totals.ignored += 1
            return
        # The call happened whatever the state is now: it is always measured...
        if outcome is _Outcome.SUCCESS:
            self._totals.success += 1
            self._metrics.breaker_outcome(self.model, "success")
        else:
            self._totals.failure += 1
            self._metrics.breaker_outcome(self.model, "failure")
        # ...but it decides only within the state (generation) it was admitted in.
        if generation != self._generation:
            return
        if outcome is _Outcome.SUCCESS:
            if self._state is State.HALF_OPEN:
                self._transition(State.CLOSED, "probe succeeded")
            self._failures = 0
        elif self._state is State.HALF_OPEN:
            self._trip("probe failed")
        else:
            self._failures += 1
            if self._failures >= self._flags.current.circuit_breaker_threshold:
                self._trip(f"{self._failures} consecutive failures")

    # ------------------------------------------------------------------ manual control

    def force_open(self) -> None:
        """Hold OPEN (no cooldown, no probes) until `force_close()` or `reset()`."""
        self._trip("forced open")
        self._forced = True

    def force_close(self) -> None:
        self._forced = False
        self._transition(State.CLOSED, "forced closed")

    def reset(self) -> None:
        """CLOSED with every counter (not the Prometheus ones) back to zero."""
        self.force_close()
        self._totals = _Totals()

    # ------------------------------------------------------------------ transitions

    def _refresh(self, now: float, settings: Settings) -> State:
        if (
            self._state is State.OPEN
            and not self._forced
            and now >= self._opened_at + settings.circuit_breaker_cooldown_s
        ):
            self._transition(State.HALF_OPEN, "cooldown passed")
        return self._state

    def _trip(self, why: str) -> None:
        self._transition(State.OPEN, why)
        # A re-trip from OPEN (manual) restarts the cooldown too.
        self._opened_at = self._clock.now()

    def _transition(self, new: State, why: str) -> None:
        old = self._state
        self._failures = 0
        self._probes.clear()
        self._forced = False
        if old is new:
            return
        self._state = new
        self._generation += 1
        self._changed_at = self._clock.now()
        self._why = why
        self._totals.transitions += 1
        self._metrics.breaker_transition(self.model, old.value, new.value)
        emit = log.warning if new is State.OPEN else log.info
        emit("circuit breaker transition", model=self.model, old=old.value, new=new.value, why=why)


class BreakerRegistry:
    """One breaker per model id, created lazily (the configured chain up front, so its state
    series exist from startup). Implements `metrics.BreakerStates`."""

    def __init__(self, flags: FlagStore, clock: Clock, metrics: Metrics) -> None:
        self._flags = flags
        self._clock = clock
        self._metrics = metrics
        self._breakers: dict[str, CircuitBreaker] = {}
        for qualified in flags.current.model_chain:
            self.get(ModelRef.parse(qualified).id)
        self._enabled = flags.current.enable_circuit_breaker
        flags.subscribe(self._on_settings)

    @property
    def enabled(self) -> bool:
        return self._flags.current.enable_circuit_breaker

    def get(self, model: str) -> CircuitBreaker:
        breaker = self._breakers.get(model)
        if breaker is None:
            breaker = CircuitBreaker(model, self._flags, self._clock, self._metrics)
            self._breakers[model] = breaker
        return breaker

    def find(self, model: str) -> CircuitBreaker | None:
        """Lookup without creating (admin routes must not mint label values)."""
        return self._breakers.get(model)

    def acquire(self, model: str) -> AnyPermit:
        """The hot-path entry: a real permit, `NOOP_PERMIT` with the flag off, or BreakerOpen."""
        if not self._flags.current.enable_circuit_breaker:
            return NOOP_PERMIT
        return self.get(model).acquire()

    def states(self) -> Iterator[tuple[str, str]]:
        for model, breaker in list(self._breakers.items()):
            yield model, breaker.state.value

    def snapshot(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "breakers": [breaker.snapshot() for breaker in list(self._breakers.values())],
        }

    def force_open(self, model: str) -> None:
        self.get(model).force_open()

    def force_close(self, model: str) -> None:
        self.get(model).force_close()

    def reset(self, model: str) -> None:
        self.get(model).reset()

    def _on_settings(self, settings: Settings) -> None:
        # Switching the flag off makes breakers inert; switching it back on must not resurrect
        # a stale OPEN from before, so turning it off closes them all.
        if self._enabled and not settings.enable_circuit_breaker:
            for breaker in self._breakers.values():
                breaker.force_close()
        self._enabled = settings.enable_circuit_breaker
