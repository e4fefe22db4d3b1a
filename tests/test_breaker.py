"""Circuit breaker state machine (SPEC §4), driven by a FakeClock: no sleeps."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from rom_agent.domain.events import Events
from rom_agent.instrumentation.prometheus import PrometheusMetrics as Metrics
from rom_agent.resilience.breaker import BreakerRegistry
from rom_agent.resilience.breaker_states import NOOP_PERMIT, BreakerOpen, State
from rom_agent.resilience.clock import FakeClock
from tests.scripted_provider import make_flags

MODEL = "rom-sim-1"


class Env:
    def __init__(self, **overrides: Any) -> None:
        settings: dict[str, Any] = {
            "enable_circuit_breaker": True,
            "circuit_breaker_threshold": 3,
            "circuit_breaker_cooldown_s": 30,
            "attempt_timeout_s": 60,
        }
        settings.update(overrides)
        self.clock = FakeClock()
        self.flags = make_flags(**settings)
        self.metrics = Metrics(
            lambda: self.flags.current.enable_metrics, ["rom-sim-1", "rom-sim-2"]
        )
        self.events = Events(self.metrics)
        self.registry = BreakerRegistry(self.flags, self.clock, self.events)
        self.metrics.breaker_source = self.registry
        self.breaker = self.registry.get(MODEL)

    def fail(self, times: int = 1) -> None:
        for _ in range(times):
            self.breaker.acquire().record_failure()

    def succeed(self) -> None:
        self.breaker.acquire().record_success()

    def trip(self) -> None:
        self.fail(self.flags.current.circuit_breaker_threshold)
        assert self.breaker.state is State.OPEN

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, {"operation": "converse", **labels})
        return 0.0 if value is None else value

    def transitions(self, old: str, new: str) -> float:
        return self.sample(
            "circuit_breaker_transitions_total", model=MODEL, **{"from": old, "to": new}
        )

    def gauge(self, state: str) -> float | None:
        return self.metrics.registry.get_sample_value(
            "circuit_breaker_state", {"operation": "converse", "model": MODEL, "state": state}
        )


@pytest.fixture
def env() -> Env:
    return Env()


# --------------------------------------------------------------------------- CLOSED → OPEN


def test_starts_closed_and_chain_breakers_exist_from_startup(env: Env) -> None:
    assert dict(env.registry.states()) == {"rom-sim-1": "CLOSED", "rom-sim-2": "CLOSED"}
    assert env.gauge("CLOSED") == 0
    assert env.gauge("OPEN") is None


def test_opens_after_threshold_consecutive_failures(env: Env) -> None:
    env.fail(2)
    assert env.breaker.state is State.CLOSED
    env.fail()
    assert env.breaker.state is State.OPEN
    assert env.sample("circuit_breaker_failure_total", model=MODEL) == 3
    assert env.transitions("CLOSED", "OPEN") == 1
    # The old state's series is gone; the new one carries the value 2.
    assert env.gauge("CLOSED") is None
    assert env.gauge("OPEN") == 2


def test_success_resets_the_consecutive_count(env: Env) -> None:
    env.fail(2)
    env.succeed()
    env.fail(2)
    assert env.breaker.state is State.CLOSED
    assert env.breaker.snapshot()["consecutiveFailures"] == 2
    env.fail()
    assert env.breaker.state is State.OPEN


def test_threshold_change_at_runtime_applies_to_the_next_failure(env: Env) -> None:
    env.fail(2)
    env.flags.set({"circuit_breaker_threshold": 2})
    assert env.breaker.state is State.CLOSED
    env.fail()
    assert env.breaker.state is State.OPEN


# --------------------------------------------------------------------------- OPEN


def test_open_rejects_fast_with_time_left_and_counts_rejections(env: Env) -> None:
    env.trip()
    env.clock.advance(10)
    with pytest.raises(BreakerOpen) as excinfo:
        env.breaker.acquire()
    assert excinfo.value.retry_after_s == pytest.approx(20)
    assert excinfo.value.state is State.OPEN
    assert env.sample("circuit_breaker_rejected_total", model=MODEL) == 1
    # A rejection is not a failure.
    assert env.sample("circuit_breaker_failure_total", model=MODEL) == 3


def test_cooldown_boundary_just_before_and_at(env: Env) -> None:
    env.trip()
    env.clock.advance(29.999)
    assert env.breaker.state is State.OPEN
    with pytest.raises(BreakerOpen):
        env.breaker.acquire()
    env.clock.advance(0.001)
    assert env.breaker.state is State.HALF_OPEN
    env.breaker.acquire()  # the probe is admitted


def test_half_open_is_visible_to_a_scrape_which_changes_nothing(env: Env) -> None:
    env.trip()
    env.clock.advance(30)
    generation = env.breaker.generation
    # Nothing but scrapes: the gauge shows HALF_OPEN, but no transition is performed.
    for _ in range(2):
        text = env.metrics.render().decode()
        assert (
            'circuit_breaker_state{model="rom-sim-1",operation="converse",state="HALF_OPEN"} 1.0'
            in text
        )
    assert env.transitions("OPEN", "HALF_OPEN") == 0
    assert env.breaker.generation == generation
    assert dict(env.registry.observed_states())[MODEL] == "HALF_OPEN"
    # The breaker's own read performs it, once.
    assert dict(env.registry.states())[MODEL] == "HALF_OPEN"
    assert env.breaker.state is State.HALF_OPEN
    assert env.transitions("OPEN", "HALF_OPEN") == 1
    assert env.breaker.generation == generation + 1


def test_cooldown_change_at_runtime_applies_to_an_open_breaker(env: Env) -> None:
    env.trip()
    env.clock.advance(10)
    env.flags.set({"circuit_breaker_cooldown_s": 5})
    assert env.breaker.state is State.HALF_OPEN


# --------------------------------------------------------------------------- HALF_OPEN


def test_probe_success_closes(env: Env) -> None:
    env.trip()
    env.clock.advance(30)
    env.breaker.acquire().record_success()
    assert env.breaker.state is State.CLOSED
    assert env.transitions("HALF_OPEN", "CLOSED") == 1
    assert env.breaker.snapshot()["consecutiveFailures"] == 0


def test_probe_failure_reopens_with_a_new_cooldown(env: Env) -> None:
    env.trip()
    env.clock.advance(30)
    probe = env.breaker.acquire()
    env.clock.advance(5)
    probe.record_failure()
    assert env.breaker.state is State.OPEN
    assert env.transitions("HALF_OPEN", "OPEN") == 1
    env.clock.advance(29.9)  # 29.9 s since the reopen, 64.9 s since the first trip
    assert env.breaker.state is State.OPEN
    env.clock.advance(0.1)
    assert env.breaker.state is State.HALF_OPEN


def test_half_open_admits_only_one_probe_by_default(env: Env) -> None:
    env.trip()
    env.clock.advance(30)
    env.breaker.acquire()
    with pytest.raises(BreakerOpen) as excinfo:
        env.breaker.acquire()
    assert excinfo.value.state is State.HALF_OPEN
    assert excinfo.value.retry_after_s > 0


async def test_concurrent_callers_in_half_open_only_max_calls_admitted() -> None:
    env = Env(circuit_breaker_half_open_max_calls=3)
    env.trip()
    env.clock.advance(30)
    release = asyncio.Event()
    admitted: list[int] = []
    rejected: list[int] = []

    async def caller(number: int) -> None:
        try:
            permit = env.breaker.acquire()
        except BreakerOpen:
            rejected.append(number)
            return
        admitted.append(number)
        await release.wait()  # the probe is in flight
        permit.record_success()

    tasks = [asyncio.create_task(caller(n)) for n in range(10)]
    await asyncio.sleep(0)
    assert len(admitted) == 3
    assert len(rejected) == 7
    assert env.breaker.snapshot()["halfOpenInFlight"] == 3
    release.set()
    await asyncio.gather(*tasks)
    # The first probe closed it; the other two were admitted in the old generation.
    assert env.breaker.state is State.CLOSED
    assert env.transitions("HALF_OPEN", "CLOSED") == 1
    assert env.sample("circuit_breaker_rejected_total", model=MODEL) == 7


def test_hung_probe_frees_its_permit_after_the_attempt_timeout(env: Env) -> None:
    env.trip()
    env.clock.advance(30)
    hung = env.breaker.acquire()
    env.clock.advance(59.9)
    with pytest.raises(BreakerOpen):
        env.breaker.acquire()
    env.clock.advance(0.1)
    probe = env.breaker.acquire()  # the lease of the hung probe expired
    probe.record_success()
    assert env.breaker.state is State.CLOSED
    # The hung probe's late verdict belongs to an earlier generation: no effect.
    hung.record_failure()
    assert env.breaker.state is State.CLOSED


def test_late_result_of_an_expired_probe_still_decides_in_its_generation(env: Env) -> None:
    # The attempt timeout fires at the same moment the lease expires: its failure counts.
    env.trip()
    env.clock.advance(30)
    probe = env.breaker.acquire()
    env.clock.advance(60)
    probe.record_failure()
    assert env.breaker.state is State.OPEN


# --------------------------------------------------------------------------- generations


def test_late_success_after_reopen_does_not_close(env: Env) -> None:
    slow = env.breaker.acquire()  # admitted while CLOSED
    env.trip()
    generation = env.breaker.generation
    slow.record_success()
    assert env.breaker.state is State.OPEN
    assert env.breaker.generation == generation
    # Measured all the same: the call did succeed.
    assert env.sample("circuit_breaker_success_total", model=MODEL) == 1


def test_late_failure_from_before_a_close_does_not_count(env: Env) -> None:
    env.trip()
    env.clock.advance(30)
    stale = env.breaker.acquire()  # a HALF_OPEN probe...
    env.breaker.force_close()  # ...overtaken by an operator
    stale.record_failure()
    assert env.breaker.state is State.CLOSED
    assert env.breaker.snapshot()["consecutiveFailures"] == 0


def test_a_second_probe_result_after_the_first_decided_is_ignored() -> None:
    env = Env(circuit_breaker_half_open_max_calls=2)
    env.trip()
    env.clock.advance(30)
    first, second = env.breaker.acquire(), env.breaker.acquire()
    first.record_failure()  # reopens
    second.record_success()  # late: must not close
    assert env.breaker.state is State.OPEN


def test_every_transition_bumps_the_generation(env: Env) -> None:
    start = env.breaker.generation
    env.trip()
    env.clock.advance(30)
    assert env.breaker.state is State.HALF_OPEN
    env.breaker.acquire().record_success()
    assert env.breaker.generation == start + 3


# --------------------------------------------------------------------------- outcomes


def test_ignored_outcomes_do_not_count_and_release_the_probe(env: Env) -> None:
    env.fail(2)
    env.breaker.acquire().record_ignored()
    env.breaker.acquire().record_ignored()
    assert env.breaker.state is State.CLOSED
    assert env.breaker.snapshot()["consecutiveFailures"] == 2
    env.fail()
    assert env.breaker.state is State.OPEN
    env.clock.advance(30)
    env.breaker.acquire().record_ignored()  # e.g. the client went away mid-probe
    probe = env.breaker.acquire()  # slot freed at once, state unchanged
    assert env.breaker.state is State.HALF_OPEN
    probe.record_success()
    assert env.breaker.state is State.CLOSED
    totals = env.breaker.snapshot()["totals"]
    assert totals["ignored"] == 3
    assert env.sample("circuit_breaker_failure_total", model=MODEL) == 3


def test_a_permit_reports_exactly_once(env: Env) -> None:
    permit = env.breaker.acquire()
    permit.record_failure()
    permit.record_failure()
    permit.record_success()
    assert env.breaker.snapshot()["consecutiveFailures"] == 1
    assert env.sample("circuit_breaker_failure_total", model=MODEL) == 1
    assert env.sample("circuit_breaker_success_total", model=MODEL) == 0


# --------------------------------------------------------------------------- manual control


def test_force_open_holds_past_the_cooldown_until_closed(env: Env) -> None:
    env.registry.force_open(MODEL)
    env.clock.advance(3600)
    assert env.breaker.state is State.OPEN
    with pytest.raises(BreakerOpen) as excinfo:
        env.breaker.acquire()
    assert excinfo.value.retry_after_s == 30
    assert env.breaker.snapshot()["forced"] is True
    env.registry.force_close(MODEL)
    assert env.breaker.state is State.CLOSED
    assert env.transitions("CLOSED", "OPEN") == 1
    assert env.transitions("OPEN", "CLOSED") == 1


def test_force_close_from_open_and_reset_clears_totals(env: Env) -> None:
    env.trip()
    env.registry.force_close(MODEL)
    assert env.breaker.state is State.CLOSED
    assert env.breaker.snapshot()["totals"]["failure"] == 3
    env.fail(2)
    env.registry.reset(MODEL)
    snapshot = env.breaker.snapshot()
    assert snapshot["state"] == "CLOSED"
    assert snapshot["consecutiveFailures"] == 0
    assert snapshot["totals"] == {
        "success": 0,
        "failure": 0,
        "rejected": 0,
        "ignored": 0,
        "transitions": 0,
    }


def test_snapshot_for_the_admin_route(env: Env) -> None:
    env.trip()
    env.clock.advance(12)
    snapshot = env.registry.snapshot()
    assert snapshot["enabled"] is True
    by_model = {entry["model"]: entry for entry in snapshot["breakers"]}
    entry = by_model[MODEL]
    assert entry["state"] == "OPEN"
    assert entry["retryAfterS"] == pytest.approx(18)
    assert entry["sinceChangeS"] == pytest.approx(12)
    assert entry["threshold"] == 3
    assert entry["generation"] == 1
    assert by_model["rom-sim-2"]["state"] == "CLOSED"


def test_find_does_not_create_breakers(env: Env) -> None:
    assert env.registry.find("nope") is None
    assert "nope" not in dict(env.registry.states())


# --------------------------------------------------------------------------- flag off


def test_flag_off_nothing_is_consulted_or_updated() -> None:
    env = Env(enable_circuit_breaker=False)
    for _ in range(10):
        permit = env.registry.acquire(MODEL)
        assert permit is NOOP_PERMIT
        permit.record_failure()
    assert env.breaker.state is State.CLOSED
    assert env.breaker.snapshot()["totals"]["failure"] == 0
    assert env.sample("circuit_breaker_failure_total", model=MODEL) == 0
    assert env.registry.snapshot()["enabled"] is False


def test_switching_the_flag_off_closes_open_breakers() -> None:
    env = Env()
    for _ in range(3):
        env.registry.acquire(MODEL).record_failure()
    assert env.breaker.state is State.OPEN
    env.flags.set({"enable_circuit_breaker": False})
    assert env.breaker.state is State.CLOSED
    env.flags.set({"enable_circuit_breaker": True})
    env.registry.acquire(MODEL).record_success()
    assert env.breaker.state is State.CLOSED


def test_metrics_disabled_records_nothing_but_state_still_works() -> None:
    env = Env(enable_metrics=False)
    env.trip()
    assert env.sample("circuit_breaker_failure_total", model=MODEL) == 0
    assert env.transitions("CLOSED", "OPEN") == 0


def test_flag_off_in_flight_failures_from_before_the_flip_do_not_count() -> None:
    """Issue 12 #3: results of calls admitted before the flag went off never decide."""
    env = Env()
    in_flight = [env.registry.acquire(MODEL) for _ in range(3)]  # admitted while CLOSED
    env.flags.set({"enable_circuit_breaker": False})
    for permit in in_flight:
        permit.record_failure()
    assert env.breaker.state is State.CLOSED
    assert env.breaker.snapshot()["mode"] == "disabled"
    env.flags.set({"enable_circuit_breaker": True})
    assert env.breaker.state is State.CLOSED
    env.registry.acquire(MODEL).record_success()  # admitted, not rejected as OPEN
    assert env.transitions("CLOSED", "OPEN") == 0


def test_flag_off_holds_closed_even_against_a_manual_open() -> None:
    env = Env(enable_circuit_breaker=False)
    env.registry.force_open(MODEL)
    assert env.breaker.state is State.CLOSED
    assert env.registry.acquire(MODEL) is NOOP_PERMIT
    assert env.gauge("CLOSED") == 0


def test_forced_open_survives_nothing_but_a_close_and_the_flag() -> None:
    env = Env()
    env.registry.force_open(MODEL)
    assert env.breaker.snapshot()["mode"] == "forced_open"
    env.flags.set({"enable_circuit_breaker": False})
    assert env.breaker.state is State.CLOSED
    env.flags.set({"enable_circuit_breaker": True})
    assert env.breaker.snapshot()["mode"] == "closed"
