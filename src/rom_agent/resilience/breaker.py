"""Circuit breaker per model (SPEC §4): a consecutive-failure count breaker with leased probes,
its states as objects (resilience4j's model).

    CLOSED ──(THRESHOLD consecutive counted failures)──▶ OPEN
    OPEN ──(COOLDOWN_S passed; evaluated by the breaker's own reads)──▶ HALF_OPEN
    HALF_OPEN ──(probe success)──▶ CLOSED        HALF_OPEN ──(probe failure)──▶ OPEN
    any ──(flag off)──▶ DISABLED (reported CLOSED)   DISABLED ──(flag on)──▶ CLOSED
    any ──(admin open)──▶ FORCED_OPEN (reported OPEN) ──(admin close / reset)──▶ CLOSED

Design points, each fixing a defect class of the Node original or of common libraries:

* No timer tasks. OPEN → HALF_OPEN happens when the breaker itself is read (a call, the admin
  routes, readiness). The Prometheus scrape only *observes* (`observed_states()`): it shows
  HALF_OPEN once the cooldown has passed but performs no transition.
* Every call holds a `BreakerPermit` and reports exactly one outcome: success, failure or
  ignored. Ignored outcomes (client cancellation, MODEL/REQUEST errors, our own deadline)
  release the permit without touching the count.
* Every change of state object bumps a generation — switching the flag off or a manual close
  of an already-CLOSED breaker included. A permit's result is applied only in the generation it
  was issued in, so a late result from before a flip or a reopen never decides anything.
* HALF_OPEN probes are leases. A lease older than ATTEMPT_TIMEOUT_S frees its slot (checked
  lazily on acquire), so a hung probe cannot wedge the breaker in HALF_OPEN.
* All state changes are synchronous between awaits on one event loop: no lock, nothing held
  across the provider call. Not thread-safe by design (one loop per process).
* Configuration is read from the flag store at call time: runtime changes apply at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from rom_agent.config import Settings
from rom_agent.domain.events import BreakerCallRecorded, BreakerTransitioned, Events
from rom_agent.domain.messages import ModelRef
from rom_agent.flags import FlagStore
from rom_agent.logs import get_logger
from rom_agent.resilience.breaker_states import (
    BreakerOpen,
    BreakerPermit,
    BreakerState,
    ClosedState,
    DisabledState,
    ForcedOpenState,
    HalfOpenState,
    Outcome,
    State,
)
from rom_agent.resilience.clock import Clock

log = get_logger(__name__)


# --------------------------------------------------------------------------- breaker


@dataclass(slots=True)
class _Totals:
    success: int = 0
    failure: int = 0
    rejected: int = 0
    ignored: int = 0
    transitions: int = 0


class CircuitBreaker:
    """The breaker of one model. Create through `BreakerRegistry`."""

    def __init__(self, model: str, flags: FlagStore, clock: Clock, events: Events) -> None:
        self.model = model
        self._flags = flags
        self._clock = clock
        self._events = events
        enabled = flags.current.enable_circuit_breaker
        self._state: BreakerState = ClosedState() if enabled else DisabledState()
        self._generation = 0
        self._changed_at = clock.now()
        self._why = ""  # why the last change happened (shown by the console)
        self._totals = _Totals()

    def now(self) -> float:
        return self._clock.now()

    # ------------------------------------------------------------------ reads

    @property
    def state(self) -> State:
        """The state now (performs a due OPEN → HALF_OPEN transition)."""
        return self._refresh(self._clock.now(), self._flags.current).reported

    def observed_state(self) -> State:
        """The state now, without performing any transition (for scrapes)."""
        return self._state.observe(self, self._clock.now(), self._flags.current)

    @property
    def generation(self) -> int:
        return self._generation

    def retry_after_s(self) -> float:
        """Seconds until this breaker admits a call again (0 when it would admit one now)."""
        now = self._clock.now()
        settings = self._flags.current
        return self._refresh(now, settings).retry_after_s(self, now, settings)

    def snapshot(self) -> dict[str, Any]:
        now = self._clock.now()
        settings = self._flags.current
        state = self._refresh(now, settings)
        return {
            "model": self.model,
            "state": state.reported.value,
            "mode": state.mode,
            "forced": isinstance(state, ForcedOpenState),
            "consecutiveFailures": state.failures if isinstance(state, ClosedState) else 0,
            "threshold": settings.circuit_breaker_threshold,
            "generation": self._generation,
            "sinceChangeS": round(now - self._changed_at, 3),
            "why": self._why,
            "retryAfterS": round(state.retry_after_s(self, now, settings), 3),
            "halfOpenInFlight": len(state.probes) if isinstance(state, HalfOpenState) else 0,
            "totals": asdict(self._totals),
        }

    # ------------------------------------------------------------------ admission

    def acquire(self) -> BreakerPermit:
        """Admit one call or raise `BreakerOpen` (counted as rejected)."""
        now = self._clock.now()
        settings = self._flags.current
        return self._refresh(now, settings).admit(self, now, settings)

    def _reject(self, state: State, retry_after_s: float) -> BreakerOpen:
        self._totals.rejected += 1
        self._events.emit(BreakerCallRecorded, self.model, "rejected")
        return BreakerOpen(self.model, state, retry_after_s)

    # ------------------------------------------------------------------ outcomes

    def _on_result(self, generation: int, probe: int, outcome: Outcome) -> None:
        state = self._state
        if probe and isinstance(state, HalfOpenState):
            state.probes.pop(probe, None)
        if outcome is Outcome.IGNORED:
            self._totals.ignored += 1
            return
        # The call happened whatever the state is now: it is always measured...
        if outcome is Outcome.SUCCESS:
            self._totals.success += 1
        else:
            self._totals.failure += 1
        self._events.emit(BreakerCallRecorded, self.model, outcome)
        # ...but it decides only within the state (generation) it was admitted in.
        if generation == self._generation:
            state.on_result(self, outcome, self._flags.current)

    # ------------------------------------------------------------------ switching

    def force_open(self) -> None:
        """Hold OPEN (no cooldown, no probes) until `force_close()` or `reset()`. With the
        flag off the breaker stays disabled (SPEC §4: the state stays CLOSED)."""
        if isinstance(self._state, DisabledState):
            log.warning("circuit breaker disabled: force open ignored", model=self.model)
            return
        self._become(ForcedOpenState(), "forced open")

    def force_close(self) -> None:
        self._become(self._idle(), "forced closed")

    def reset(self) -> None:
        """CLOSED with every counter (not the Prometheus ones) back to zero."""
        self.force_close()
        self._totals = _Totals()

    def set_enabled(self, enabled: bool) -> None:
        """The flag switches the state: off → DISABLED, on → CLOSED (from scratch)."""
        if enabled != isinstance(self._state, DisabledState):
            return
        self._become(ClosedState() if enabled else DisabledState(), "flag switched")

    def _idle(self) -> BreakerState:
        return ClosedState() if self._flags.current.enable_circuit_breaker else DisabledState()

    def hint_half_open(self, why: str) -> bool:
        """A peer replica saw this model fail provider-wide (fleet hint): from CLOSED, go to
        HALF_OPEN so only the half-open number of probes reach it and the rest fall back.
        True if the state changed."""
        if not isinstance(self._state, ClosedState):
            return False
        self._become(HalfOpenState(), why)
        return True

    # ------------------------------------------------------------------ transitions

    def _refresh(self, now: float, settings: Settings) -> BreakerState:
        state = self._state
        if state.timed:
            following = state.due(self, now, settings)
            if following is not None:
                self._become(following, "cooldown passed")
                return self._state
        return state

    def _become(self, new: BreakerState, why: str) -> None:
        old = self._state
        self._state = new
        # A new state object is a new generation, even CLOSED → CLOSED: results of calls
        # admitted before never decide in it.
        self._generation += 1
        self._changed_at = self._clock.now()
        self._why = why
        if old.reported is new.reported:
            if old.mode != new.mode:
                log.info("circuit breaker mode", model=self.model, old=old.mode, new=new.mode)
            return
        self._totals.transitions += 1
        self._events.emit(
            BreakerTransitioned, self.model, old.reported.value, new.reported.value, why
        )
        emit = log.warning if new.reported is State.OPEN else log.info
        emit(
            "circuit breaker transition",
            model=self.model,
            old=old.reported.value,
            new=new.reported.value,
            why=why,
        )


class BreakerRegistry:
    """One breaker per model id, created lazily (the configured chain up front, so its state
    series exist from startup). Implements `instrumentation.prometheus.BreakerStates`."""

    def __init__(self, flags: FlagStore, clock: Clock, events: Events) -> None:
        self._flags = flags
        self._clock = clock
        self._events = events
        self._breakers: dict[str, CircuitBreaker] = {}
        for qualified in flags.current.model_chain:
            self.get(ModelRef.parse(qualified).id)
        flags.subscribe(self._on_settings)

    @property
    def enabled(self) -> bool:
        return self._flags.current.enable_circuit_breaker

    def get(self, model: str) -> CircuitBreaker:
        breaker = self._breakers.get(model)
        if breaker is None:
            breaker = CircuitBreaker(model, self._flags, self._clock, self._events)
            self._breakers[model] = breaker
        return breaker

    def find(self, model: str) -> CircuitBreaker | None:
        """Lookup without creating (admin routes must not mint label values)."""
        return self._breakers.get(model)

    def acquire(self, model: str) -> BreakerPermit:
        """The hot-path entry: a permit (`NOOP_PERMIT` when disabled) or BreakerOpen."""
        return self.get(model).acquire()

    def states(self) -> Iterator[tuple[str, str]]:
        """(model, state) for every breaker, performing due transitions."""
        for model, breaker in list(self._breakers.items()):
            yield model, breaker.state.value

    def observed_states(self) -> Iterator[tuple[str, str]]:
        """(model, state) for every breaker as of now, changing nothing (for scrapes)."""
        for model, breaker in list(self._breakers.items()):
            yield model, breaker.observed_state().value

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
        for breaker in self._breakers.values():
            breaker.set_enabled(settings.enable_circuit_breaker)
