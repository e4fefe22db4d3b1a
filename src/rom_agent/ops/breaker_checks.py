"""The staging guide's stage B checks: the circuit breaker goes CLOSED → OPEN → HALF_OPEN →
CLOSED under forced failures, exactly at CIRCUIT_BREAKER_THRESHOLD and after
CIRCUIT_BREAKER_COOLDOWN_S (both read from /admin/flags), and the fallback metrics move by
exact amounts. Needs fault injection (FORCE_ERROR) for the drill."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from rom_agent.ops.client import ApiCallError
from rom_agent.ops.steps import Sleep, Steps, shown, wait_with_progress
from rom_agent.ops.target import (
    FAULT_FLAG,
    OPERATION,
    Sample,
    Samples,
    Target,
    describe,
    drills,
    model_ids,
)

STATE_VALUES = {"CLOSED": 0.0, "HALF_OPEN": 1.0, "OPEN": 2.0}


@dataclass(frozen=True, slots=True)
class BreakerView:
    """One model's `circuit_breaker_state` series, as read from /metrics."""

    series: tuple[Sample, ...]

    def __str__(self) -> str:
        if not self.series:
            return "no circuit_breaker_state series"
        return " + ".join(sample.line() for sample in self.series)


def breaker_view(samples: Samples, model: str) -> BreakerView:
    series = samples.series("circuit_breaker_state", model=model, operation=OPERATION)
    return BreakerView(tuple(series))


def state_line(model: str, state: str) -> str:
    """The one series a breaker in `state` must show (checks compare it verbatim)."""
    labels = f'model="{model}",operation="{OPERATION}",state="{state}"'
    return f"circuit_breaker_state{{{labels}}} {STATE_VALUES[state]!r}"


def transitions(samples: Samples, model: str, old: str, new: str) -> float:
    labels = {"model": model, "operation": OPERATION, "from": old, "to": new}
    return samples.total("circuit_breaker_transitions_total", **labels)


def validate_breaker(
    target: Target,
    steps: Steps,
    *,
    enable_drills: bool,
    drills_always_off: bool = False,
    sleep: Sleep = time.sleep,
) -> bool:
    """The guide's stage B checks (3.1 to 5). True when every check passed."""
    try:
        _breaker_checks(target, steps, enable_drills, drills_always_off, sleep)
    except ApiCallError as exc:
        steps.check("B", "admin/API calls succeed", False, observed=str(exc), expected="no error")
    return steps.passed


def _breaker_checks(
    target: Target, steps: Steps, enable_drills: bool, always_off: bool, sleep: Sleep
) -> None:
    steps.section("B 3.1 feature flag (GET /admin/flags)")
    flags = target.flags()
    enabled = flags["ENABLE_CIRCUIT_BREAKER"]
    steps.expect("B3.1", "ENABLE_CIRCUIT_BREAKER is true", observed=shown(enabled), expected="true")
    chain = model_ids(flags)
    primary = chain[0]
    threshold = int(flags["CIRCUIT_BREAKER_THRESHOLD"])
    cooldown = float(flags["CIRCUIT_BREAKER_COOLDOWN_S"])
    steps.info(
        f"from /admin/flags: CIRCUIT_BREAKER_THRESHOLD={threshold} "
        f"CIRCUIT_BREAKER_COOLDOWN_S={cooldown:g} MODEL_CHAIN={','.join(chain)} "
        f"(primary {primary})"
    )

    steps.section("B 3.2 metrics present (GET /metrics)")
    before = target.metrics()
    labels = {"model": primary, "operation": OPERATION}
    for name in ("circuit_breaker_success_total", "circuit_breaker_failure_total"):
        value = before.value(name, **labels)
        steps.check(
            "B3.2",
            f"{name} series for {primary}",
            value is not None,
            observed="absent" if value is None else Sample(name, labels, value).line(),
            expected="a sample line",
        )

    with drills(target, steps, enable=enable_drills, always_off=always_off) as active:
        if not active:
            steps.check(
                "B4.2",
                f"{FAULT_FLAG} is true (FORCE_ERROR needs it)",
                False,
                observed="false",
                expected="true: set it, or pass --enable-drills to switch it on for the drill",
            )
            steps.skip("B4-5", "breaker cycle", f"not run: {FAULT_FLAG} is off")
        else:
            _breaker_cycle(target, steps, chain, threshold, cooldown, before, sleep)


def _breaker_cycle(
    target: Target,
    steps: Steps,
    chain: Sequence[str],
    threshold: int,
    cooldown: float,
    before: Samples,
    sleep: Sleep,
) -> None:
    primary = chain[0]
    steps.section("B 4.1 initial state")
    initial = breaker_view(before, primary)
    if not steps.expect(
        "B4.1",
        f"{primary} breaker CLOSED",
        observed=initial,
        expected=state_line(primary, "CLOSED"),
    ):
        steps.skip("B4.2-4.7", "breaker cycle", "not run: the breaker did not start CLOSED")
        return

    steps.section(f"B 4.2 {threshold} forced failures (CIRCUIT_BREAKER_THRESHOLD)")
    answers: list[str] = []
    for i in range(1, threshold + 1):
        reply = target.chat(f"FORCE_ERROR_{i}", f"cb-test-{i}")
        answers.append(describe(reply))
        steps.info(f"failure {i}/{threshold}: {answers[-1]}")
        if i == threshold - 1:
            # One short of the threshold must not open it: the threshold is exact.
            almost = breaker_view(target.metrics(), primary)
            steps.expect(
                "B4.2",
                f"{primary} still CLOSED after {i} failures",
                observed=almost,
                expected=state_line(primary, "CLOSED"),
            )
    steps.expect(
        "B4.2",
        "each forced failure answered 502 UPSTREAM_FAILED",
        observed=", ".join(answers),
        expected=", ".join(["502 UPSTREAM_FAILED"] * threshold),
    )

    steps.section("B 4.3 OPEN")
    opened = target.metrics()
    view = breaker_view(opened, primary)
    failures = opened.total("circuit_breaker_failure_total", model=primary) - before.total(
        "circuit_breaker_failure_total", model=primary
    )
    steps.expect(
        "B4.3",
        f"circuit_breaker_failure_total{{model={primary}}} grew by {threshold}",
        observed=f"+{failures:g}",
        expected=f"+{threshold}",
    )
    if not steps.expect(
        "B4.3", f"{primary} breaker OPEN", observed=view, expected=state_line(primary, "OPEN")
    ):
        steps.skip("B4.4-4.7", "cooldown and recovery", "not run: the breaker did not open")
        return
    _check_transition(steps, "B4.3", before, opened, primary, "CLOSED", "OPEN")
    _check_fast_rejection(target, steps, opened, chain, cooldown)

    steps.section("B 4.4 cooldown (CIRCUIT_BREAKER_COOLDOWN_S)")
    wait_with_progress(cooldown + 1, "cooldown + 1 s, no request sent", steps.out, sleep=sleep)

    steps.section("B 4.5 HALF_OPEN, with no request sent")
    view = breaker_view(target.metrics(), primary)
    if not steps.expect(
        "B4.5",
        f"{primary} breaker HALF_OPEN",
        observed=view,
        expected=state_line(primary, "HALF_OPEN"),
    ):
        steps.skip("B4.6-4.7", "recovery", "not run: the breaker did not reach HALF_OPEN")
        return

    steps.section("B 4.6 recovery request")
    reply = target.chat("Teste recuperação", "cb-recovery")
    used = reply.json().get("modelUsed") if reply.ok else None
    steps.expect(
        "B4.6",
        f"recovery answered 200 by {primary}",
        observed=f"{describe(reply)} modelUsed={used}",
        expected=f"200 modelUsed={primary}",
    )

    steps.section("B 4.7 CLOSED again")
    after = target.metrics()
    view = breaker_view(after, primary)
    steps.expect(
        "B4.7", f"{primary} breaker CLOSED", observed=view, expected=state_line(primary, "CLOSED")
    )
    # Counted from the first scrape: the OPEN -> HALF_OPEN transition happens while /metrics
    # is rendered, so its counter only shows from the scrape after that one.
    for old, new in (("OPEN", "HALF_OPEN"), ("HALF_OPEN", "CLOSED")):
        _check_transition(steps, "B4.7", before, after, primary, old, new)
    for model in chain[1:]:
        # Fallbacks got no traffic since the primary answered: they probe on their next call.
        steps.info(f"{model}: {breaker_view(after, model)}")

    steps.section("B 5 fallback metrics")
    _check_fallback_metrics(steps, (before, opened, after), primary, threshold)


def _check_transition(
    steps: Steps, step: str, before: Samples, after: Samples, model: str, old: str, new: str
) -> None:
    grown = transitions(after, model, old, new) - transitions(before, model, old, new)
    steps.expect(
        step,
        f"circuit_breaker_transitions_total{{{old}->{new}}} grew by 1",
        observed=f"+{grown:g}",
        expected="+1",
    )


def _check_fast_rejection(
    target: Target, steps: Steps, samples: Samples, chain: Sequence[str], cooldown: float
) -> None:
    """Every breaker of the chain is OPEN ⇒ a normal request is refused at once, 503."""
    if any(str(breaker_view(samples, m)) != state_line(m, "OPEN") for m in chain):
        steps.info("not every breaker of the chain is OPEN: fast rejection not checked")
        return
    reply = target.chat("Teste circuito aberto", "cb-open")
    retry_after = reply.headers.get("retry-after", "")
    ok = (
        describe(reply) == "503 CIRCUIT_OPEN"
        and retry_after.isdigit()
        and 1 <= int(retry_after) <= math.ceil(cooldown)
    )
    steps.check(
        "B4.3",
        "a request while OPEN is refused: 503 CIRCUIT_OPEN with Retry-After",
        ok,
        observed=f"{describe(reply)} Retry-After={retry_after or '-'}",
        expected=f"503 CIRCUIT_OPEN Retry-After=1..{math.ceil(cooldown)}",
    )


def _check_fallback_metrics(
    steps: Steps, scrapes: tuple[Samples, Samples, Samples], primary: str, threshold: int
) -> None:
    """Presence (the guide), and two exact deltas: each forced failure exhausted the chain
    (first scrape → OPEN), and the recovery was answered by the primary (OPEN → the end)."""
    before, opened, after = scrapes
    for name in (
        "model_fallback_total",
        "model_fallback_attempt_total",
        "model_fallback_success_total",
        "model_fallback_exhausted_total",
    ):
        found = after.series(name, operation=OPERATION)
        steps.check(
            "B5",
            f"{name} present",
            bool(found),
            observed=found[0].line() if found else "absent",
            expected="a sample line",
        )
    exhausted = opened.total("model_fallback_exhausted_total") - before.total(
        "model_fallback_exhausted_total"
    )
    steps.expect(
        "B5",
        "model_fallback_exhausted_total grew by the forced failures",
        observed=f"+{exhausted:g}",
        expected=f"+{threshold}",
    )
    answered = after.total("model_fallback_success_total", model=primary) - opened.total(
        "model_fallback_success_total", model=primary
    )
    steps.expect(
        "B5",
        f"model_fallback_success_total{{model={primary}}} grew by the recovery",
        observed=f"+{answered:g}",
        expected="+1",
    )
