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

import enum
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from rom_agent.config import Settings
from rom_agent.domain.events import BreakerCallRecorded, BreakerTransitioned, Events
from rom_agent.domain.messages import ModelRef
from rom_agent.flags import FlagStore
from rom_agent.logs import get_logger
from rom_agent.resilience.clock import Clock

log = get_logger(__name__)

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


class _Outcome(enum.StrEnum):
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
        self._settle(_Outcome.SUCCESS)

    def record_failure(self) -> None:
        self._settle(_Outcome.FAILURE)

    def record_ignored(self) -> None:
        self._settle(_Outcome.IGNORED)

    def _settle(self, outcome: _Outcome) -> None:
        if not self._settled and self._breaker is not None:
            self._settled = True
            self._breaker._on_result(self._generation, self._probe, outcome)


# What a disabled breaker hands out: nothing is consulted or updated.
NOOP_PERMIT = BreakerPermit(None, 0, 0)


# --------------------------------------------------------------------------- states


class _BreakerState:
    """One state of one breaker. `reported` is what the gauge and the admin route show."""

    __slots__ = ()
    reported = State.CLOSED
    mode = "closed"
    timed = False  # has time-driven transitions (`due`): only those are refreshed on reads

    def observe(self, breaker: CircuitBreaker, now: float, settings: Settings) -> State:
        """The state as of `now`, without changing anything."""
        return self.reported

    def due(self, breaker: CircuitBreaker, now: float, settings: Settings) -> _BreakerState | None:
        """The state this one must turn into as of `now`, if any (time-driven transitions)."""
        return None

    def admit(self, breaker: CircuitBreaker, now: float, settings: Settings) -> BreakerPermit:
        raise breaker._reject(self.reported, self.retry_after_s(breaker, now, settings))

    def retry_after_s(self, breaker: CircuitBreaker, now: float, settings: Settings) -> float:
        return 0.0

    def on_result(self, breaker: CircuitBreaker, outcome: _Outcome, settings: Settings) -> None:
        """A counted outcome of a call admitted in this state (same generation)."""


class _Closed(_BreakerState):
    __slots__ = ("failures",)
    reported = State.CLOSED
    mode = "closed"

    def __init__(self) -> None:
        self.failures = 0  # consecutive counted failures

    def admit(self, breaker: CircuitBreaker, now: float, settings: Settings) -> BreakerPermit:
        return BreakerPermit(breaker, breaker._generation, 0)

    def on_result(self, breaker: CircuitBreaker, outcome: _Outcome, settings: Settings) -> None:
        if outcome is _Outcome.SUCCESS:
            self.failures = 0
            return
        self.failures += 1
        if self.failures >= settings.circuit_breaker_threshold:
            breaker._become(_Open(breaker.now()), f"{self.failures} consecutive failures")


class _Open(_BreakerState):
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

    def due(self, breaker: CircuitBreaker, now: float, settings: Settings) -> _BreakerState | None:
        return _HalfOpen() if self._cooled(now, settings) else None

    def retry_after_s(self, breaker: CircuitBreaker, now: float, settings: Settings) -> float:
        return max(0.0, self.opened_at + settings.circuit_breaker_cooldown_s - now)


class _HalfOpen(_BreakerState):
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

    def on_result(self, breaker: CircuitBreaker, outcome: _Outcome, settings: Settings) -> None:
        if outcome is _Outcome.SUCCESS:
            breaker._become(_Closed(), "probe succeeded")
        else:
            breaker._become(_Open(breaker.now()), "probe failed")


class _ForcedOpen(_BreakerState):
    """Manual OPEN: no cooldown, no probes, held until closed or reset."""

    __slots__ = ()
    reported = State.OPEN
    mode = "forced_open"

    def retry_after_s(self, breaker: CircuitBreaker, now: float, settings: Settings) -> float:
        return settings.circuit_breaker_cooldown_s


class _Disabled(_BreakerState):
    """ENABLE_CIRCUIT_BREAKER off: admits everything, records nothing, reports CLOSED."""

    __slots__ = ()
    reported = State.CLOSED
    mode = "disabled"

    def admit(self, breaker: CircuitBreaker, now: float, settings: Settings) -> BreakerPermit:
        return NOOP_PERMIT


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
        self._state: _BreakerState = _Closed() if enabled else _Disabled()
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
            "forced": isinstance(state, _ForcedOpen),
            "consecutiveFailures": state.failures if isinstance(state, _Closed) else 0,
            "threshold": settings.circuit_breaker_threshold,
            "generation": self._generation,
            "sinceChangeS": round(now - self._changed_at, 3),
            "why": self._why,
            "retryAfterS": round(state.retry_after_s(self, now, settings), 3),
            "halfOpenInFlight": len(state.probes) if isinstance(state, _HalfOpen) else 0,
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

    def _on_result(self, generation: int, probe: int, outcome: _Outcome) -> None:
        state = self._state
        if probe and isinstance(state, _HalfOpen):
            state.probes.pop(probe, None)
        if outcome is _Outcome.IGNORED:
            self._totals.ignored += 1
            return
        # The call happened whatever the state is now: it is always measured...
        if outcome is _Outcome.SUCCESS:
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
        if isinstance(self._state, _Disabled):
            log.warning("circuit breaker disabled: force open ignored", model=self.model)
            return
        self._become(_ForcedOpen(), "forced open")

    def force_close(self) -> None:
        self._become(self._idle(), "forced closed")

    def reset(self) -> None:
        """CLOSED with every counter (not the Prometheus ones) back to zero."""
        self.force_close()
        self._totals = _Totals()

    def set_enabled(self, enabled: bool) -> None:
        """The flag switches the state: off → DISABLED, on → CLOSED (from scratch)."""
        if enabled != isinstance(self._state, _Disabled):
            return
        self._become(_Closed() if enabled else _Disabled(), "flag switched")

    def _idle(self) -> _BreakerState:
        return _Closed() if self._flags.current.enable_circuit_breaker else _Disabled()

    def hint_half_open(self, why: str) -> bool:
        """A peer replica saw this model fail provider-wide (fleet hint): from CLOSED, go to
        HALF_OPEN so only the half-open number of probes reach it and the rest fall back.
        True if the state changed."""
        if not isinstance(self._state, _Closed):
            return False
        self._become(_HalfOpen(), why)
        return True

    # ------------------------------------------------------------------ transitions

    def _refresh(self, now: float, settings: Settings) -> _BreakerState:
        state = self._state
        if state.timed:
            following = state.due(self, now, settings)
            if following is not None:
                self._become(following, "cooldown passed")
                return self._state
        return state

    def _become(self, new: _BreakerState, why: str) -> None:
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
