"""Staging validation of the circuit breaker and the bottleneck (SPEC §9; guide stages B and C).

Run from a checkout (the scripts are thin wrappers around this module):

    export BASE_URL=http://127.0.0.1:8000          # default
    read -rs ADMIN_TOKEN && export ADMIN_TOKEN     # never on the command line
    scripts/validate-circuit-breaker.sh [--enable-drills]
    scripts/validate-bottleneck.sh [--enable-drills] [--delay-ms 3000]

or, with the package installed, `rom-agent validate breaker|bottleneck [--url URL] ...`.
`ROM_AGENT_API_KEY` is sent as the chat routes' bearer key when the service has `API_KEYS`.

Every check is a numbered step printed as `[PASS]`/`[FAIL]`/`[SKIP]` with the observed and the
expected value; limits (threshold, cooldown, MAX_CONCURRENT, MAX_QUEUE) are read from
`/admin/flags`, never assumed. Exit status: 0 every check passed, 1 a check failed or the service
could not be reached, 2 bad usage (no token, bad URL).

Drills. The forced failures (`FORCE_ERROR`) and the burst's `X-Fault: delay_ms` need
`ENABLE_FAULT_INJECTION`. Without it the breaker script fails at once with a clear message; the
bottleneck script sends the burst unslowed and relies on the provider's own latency (a real
model, or a simulator started with `SIMULATOR_LATENCY_MS`). `--enable-drills` switches fault
injection on for the drill only and off again afterwards, whatever happens. If it was already on,
it is left as the operator set it, with a reminder.

The checks assume a quiet service: they compare exact metric deltas and exact response counts,
and the metrics are per process (run them against one instance, not through a load balancer).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TextIO

from rom_agent.ops.client import (
    DEFAULT_URL,
    AdminClient,
    ApiCallError,
    Reply,
    error_of,
    is_local_or_tls,
)

OPERATION = "converse"
STATE_VALUES = {"CLOSED": 0.0, "HALF_OPEN": 1.0, "OPEN": 2.0}
BURST_EXTRA = 5  # the guide: 30 requests against 5 + 20 ⇒ exactly 5 rejected
DEFAULT_DELAY_MS = 3000
MAX_BURST = 1000
FAULT_FLAG = "ENABLE_FAULT_INJECTION"

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

Sleep = Callable[[float], None]


# ---------------------------------------------------------------------- steps and checks


class Outcome(StrEnum):
    PASS = "PASS"
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclass(frozen=True, slots=True)
class Check:
    step: str
    name: str
    outcome: Outcome
    observed: str
    expected: str


@dataclass
class Steps:
    """Prints each step as it happens and keeps the checks and flag changes for a report."""

    out: TextIO = field(default_factory=lambda: sys.stdout)
    checks: list[Check] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)

    def section(self, title: str) -> None:
        self._print(f"\n== {title}")

    def info(self, text: str) -> None:
        self._print(f"   {text}")

    def action(self, text: str) -> None:
        self.actions.append(text)
        self._print(f"   -> {text}")

    def check(self, step: str, name: str, ok: bool, *, observed: Any, expected: Any) -> bool:
        """A check judged by `ok`; `observed`/`expected` are what the operator reads."""
        outcome = Outcome.PASS if ok else Outcome.FAIL
        self._record(Check(step, name, outcome, str(observed), str(expected)))
        return ok

    def expect(self, step: str, name: str, *, observed: Any, expected: Any) -> bool:
        """A check that passes only when the observed text is exactly the expected text."""
        return self.check(
            step, name, str(observed) == str(expected), observed=observed, expected=expected
        )

    def skip(self, step: str, name: str, reason: str) -> None:
        self._record(Check(step, name, Outcome.SKIP, reason, "-"))

    @property
    def failed(self) -> list[Check]:
        return [check for check in self.checks if check.outcome is Outcome.FAIL]

    @property
    def passed(self) -> bool:
        # A run with no check at all validated nothing.
        return bool(self.checks) and not self.failed

    def _record(self, check: Check) -> None:
        self.checks.append(check)
        head = f"[{check.outcome}] {check.step} {check.name}"
        if check.outcome is Outcome.FAIL:
            indent = " " * 7
            text = f"{head}\n{indent}observed: {check.observed}\n{indent}expected: {check.expected}"
        elif check.outcome is Outcome.SKIP or check.observed == check.expected:
            text = f"{head}: {check.observed}"
        else:
            text = f"{head}: {check.observed} (expected {check.expected})"
        self._print(text)

    def _print(self, text: str) -> None:
        print(text, file=self.out, flush=True)


def wait_with_progress(
    seconds: float, label: str, out: TextIO, *, sleep: Sleep = time.sleep
) -> None:
    """Sleep `seconds`, showing the countdown (a line every 5 s when not on a terminal)."""
    tty = out.isatty()
    total = math.ceil(seconds)
    print(f"   waiting {seconds:g} s: {label}", file=out, flush=True)
    elapsed = 0.0
    while elapsed < seconds:
        step = min(1.0, seconds - elapsed)
        sleep(step)
        elapsed += step
        done = min(math.ceil(elapsed), total)
        if tty:
            print(f"\r   ... {done}/{total} s", end="", file=out, flush=True)
        elif done % 5 == 0 or elapsed >= seconds:
            print(f"   ... {done}/{total} s", file=out, flush=True)
    if tty:
        print(file=out, flush=True)


def shown(value: Any) -> str:
    """A flag value as an environment variable would hold it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    return str(value)


# ---------------------------------------------------------------------- Prometheus text


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float

    def line(self) -> str:
        """The sample as Prometheus prints it (labels sorted, as prometheus-client does)."""
        labels = ",".join(f'{key}="{value}"' for key, value in sorted(self.labels.items()))
        return (
            f"{self.name}{{{labels}}} {self.value!r}" if labels else f"{self.name} {self.value!r}"
        )


class Samples:
    """Parsed sample lines. `# HELP`/`# TYPE` comments are never matched (the Node scripts'
    vacuous pass came from grepping them)."""

    def __init__(self, text: str) -> None:
        self._samples: list[Sample] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            match = _SAMPLE.match(line)
            if match is None:
                continue
            name, labels, value = match.groups()
            parsed = dict(_LABEL.findall(labels or ""))
            self._samples.append(Sample(name, parsed, float(value)))

    def series(self, name: str, **labels: str) -> list[Sample]:
        """Samples of `name` whose labels include `labels`."""
        return [
            sample
            for sample in self._samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float | None:
        """The one sample with exactly these labels, or None."""
        for sample in self._samples:
            if sample.name == name and dict(sample.labels) == labels:
                return sample.value
        return None

    def total(self, name: str, **labels: str) -> float:
        """Sum over the samples matching `labels` (0 when there are none yet)."""
        return sum(sample.value for sample in self.series(name, **labels))


# ---------------------------------------------------------------------- the service


class Target:
    """The service under validation: admin, chat and metrics calls."""

    def __init__(self, client: AdminClient, api_key: str | None = None) -> None:
        self.client = client
        self._api_key = api_key

    @property
    def url(self) -> str:
        return self.client.base_url

    def flags(self) -> dict[str, Any]:
        flags: dict[str, Any] = self.client.get_flags()["flags"]
        return flags

    def set_flags(self, changes: Mapping[str, Any], steps: Steps, why: str) -> None:
        result = self.client.set_flags(changes)
        for key, change in result["changed"].items():
            old, new = shown(change["old"]), shown(change["new"])
            steps.action(f"{key}: {old} -> {new} ({why})")

    def metrics(self) -> Samples:
        reply = self.client.request("GET", "/metrics", headers={"Accept": "text/plain"})
        if reply.status != 200:
            raise ApiCallError("GET /metrics failed (is ENABLE_METRICS true?)", status=reply.status)
        return Samples(reply.text)

    def chat(
        self,
        message: str,
        conversation_id: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 30.0,
    ) -> Reply:
        sent = dict(headers or {})
        if self._api_key:
            sent["Authorization"] = f"Bearer {self._api_key}"
        body = {"mensagem": message, "conversationId": conversation_id}
        return self.client.request(
            "POST", "/api/chat", body=body, headers=sent, timeout_s=timeout_s
        )


def model_ids(flags: Mapping[str, Any]) -> list[str]:
    """Model ids of MODEL_CHAIN without the provider prefix (what metric labels use)."""
    return [str(entry).partition("/")[2] or str(entry) for entry in flags["MODEL_CHAIN"]]


def describe(reply: Reply) -> str:
    """`502 UPSTREAM_FAILED` or `200`: what a check shows of a chat answer."""
    if reply.ok:
        return str(reply.status)
    error = error_of(reply)
    return f"{reply.status} {error.code}" if error.code else str(reply.status)


@contextlib.contextmanager
def drills(
    target: Target, steps: Steps, *, enable: bool, always_off: bool = False
) -> Iterator[bool]:
    """Yields whether fault injection is on for the drill.

    With `enable`, switches it on if needed and, on the way out (also on failure or Ctrl-C),
    off again if this run switched it on — or in every case with `always_off` (the rollout
    never leaves a service with fault injection on).
    """
    was_on = target.flags()[FAULT_FLAG] is True
    switched = False
    if not was_on and enable:
        target.set_flags({FAULT_FLAG: True}, steps, "drill")
        switched = True
    try:
        yield was_on or switched
    finally:
        if switched or (always_off and was_on):
            _drills_off(target, steps)
        elif was_on:
            steps.info(
                f"{FAULT_FLAG} is still true, as you set it; switch it off after the drills: "
                f"rom-agent flags set {FAULT_FLAG}=false"
            )


def _drills_off(target: Target, steps: Steps) -> None:
    try:
        target.set_flags({FAULT_FLAG: False}, steps, "drill over")
        observed = target.flags()[FAULT_FLAG]
    except ApiCallError as exc:
        observed = f"could not switch it off: {exc}"
    steps.expect(
        "drill", f"{FAULT_FLAG} is back to false", observed=shown(observed), expected="false"
    )


# ---------------------------------------------------------------------- circuit breaker


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


# ---------------------------------------------------------------------- bottleneck


@dataclass(frozen=True, slots=True)
class Answer:
    status: int | None  # None: no HTTP answer (timeout, connection error)
    code: str | None
    error: str | None
    retry_after: str | None
    elapsed_s: float

    @property
    def kind(self) -> str:
        if self.status is None:
            return "no answer"
        return f"{self.status} {self.code}" if self.code else str(self.status)


def burst(
    target: Target,
    count: int,
    *,
    headers: Mapping[str, str],
    timeout_s: float,
    out: TextIO,
) -> list[Answer]:
    """`count` chat requests released together (one thread and connection each)."""
    start = threading.Barrier(count)

    def one(i: int) -> Answer:
        start.wait(timeout=30)
        began = time.monotonic()
        try:
            reply = target.chat(
                f"Teste concorrência {i}", f"bn-test-{i}", headers=headers, timeout_s=timeout_s
            )
        except ApiCallError as exc:
            return Answer(None, None, str(exc), None, time.monotonic() - began)
        elapsed = time.monotonic() - began
        if reply.ok:
            return Answer(reply.status, None, None, None, elapsed)
        error = error_of(reply)
        return Answer(
            reply.status, error.code, error.message, reply.headers.get("retry-after"), elapsed
        )

    answers: list[Answer] = []
    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(one, i) for i in range(1, count + 1)]
        for future in as_completed(futures):
            answers.append(future.result())
            if len(answers) % 5 == 0 or len(answers) == count:
                tally = summary(answers)
                print(f"   ... {len(answers)}/{count} answered: {tally}", file=out, flush=True)
    return answers


def summary(answers: Sequence[Answer]) -> str:
    counts = Counter(answer.kind for answer in answers)
    return ", ".join(f"{kind} x{n}" for kind, n in sorted(counts.items()))


def validate_bottleneck(
    target: Target,
    steps: Steps,
    *,
    enable_drills: bool,
    drills_always_off: bool = False,
    delay_ms: int = DEFAULT_DELAY_MS,
) -> bool:
    """The guide's stage C checks (3.1 to 4.3). True when every check passed."""
    try:
        _bottleneck_checks(target, steps, enable_drills, drills_always_off, delay_ms)
    except ApiCallError as exc:
        steps.check("C", "admin/API calls succeed", False, observed=str(exc), expected="no error")
    return steps.passed


_COUNTERS = (
    ("bottleneck_running_total", {"operation": OPERATION}),
    ("bottleneck_queued_total", {"operation": OPERATION}),
    ("bottleneck_rejected_total", {"operation": OPERATION, "reason": "queue_full"}),
)


def _bottleneck_checks(
    target: Target, steps: Steps, enable_drills: bool, always_off: bool, delay_ms: int
) -> None:
    steps.section("C 3.1 feature flag (GET /admin/flags)")
    flags = target.flags()
    enabled = flags["ENABLE_BOTTLENECK"]
    steps.expect("C3.1", "ENABLE_BOTTLENECK is true", observed=shown(enabled), expected="true")
    concurrent, queue = int(flags["MAX_CONCURRENT"]), int(flags["MAX_QUEUE"])
    steps.info(
        f"from /admin/flags: MAX_CONCURRENT={concurrent} MAX_QUEUE={queue} "
        f"QUEUE_TIMEOUT_S={flags['QUEUE_TIMEOUT_S']:g}"
    )

    steps.section("C 3.2 metrics present (GET /metrics)")
    before = target.metrics()
    for name, labels in _COUNTERS:
        value = before.value(name, **labels)
        steps.check(
            "C3.2",
            f"{name} series",
            value is not None,
            observed="absent" if value is None else Sample(name, labels, value).line(),
            expected="a sample line",
        )

    idle = target.client.bottleneck()
    if not steps.expect(
        "C4",
        "no request running or queued before the burst (exact counts need a quiet service)",
        observed=f"running={idle['running']} queued={idle['queued']}",
        expected="running=0 queued=0",
    ):
        steps.skip("C4.1-4.3", "burst", "not run: the service is busy")
        return

    with drills(target, steps, enable=enable_drills, always_off=always_off) as active:
        _burst_checks(target, steps, concurrent, queue, before, delay_ms if active else None)


def _burst_checks(
    target: Target,
    steps: Steps,
    concurrent: int,
    queue: int,
    before: Samples,
    delay_ms: int | None,
) -> None:
    count = concurrent + queue + BURST_EXTRA
    steps.section(f"C 4.1 burst of {count} simultaneous requests (MAX_CONCURRENT + MAX_QUEUE + 5)")
    if not steps.check(
        "C4.1",
        "burst small enough to send from here (one thread per request)",
        count <= MAX_BURST,
        observed=count,
        expected=f"<= {MAX_BURST}: validate with smaller limits, then raise them",
    ):
        return
    headers: dict[str, str] = {}
    if delay_ms is None:
        steps.info(
            f"{FAULT_FLAG} is off: the requests are not slowed; this relies on the provider's "
            "own latency (pass --enable-drills for a deterministic burst)"
        )
        timeout_s = 120.0
    else:
        headers["X-Fault"] = f"delay_ms={delay_ms}"
        steps.info(f"each request held {delay_ms} ms by X-Fault: delay_ms={delay_ms}")
        waves = math.ceil((concurrent + queue) / concurrent)
        timeout_s = waves * delay_ms / 1000 + 30
    answers = burst(target, count, headers=headers, timeout_s=timeout_s, out=steps.out)

    steps.section("C 4.2 outcome")
    ok_answers = [a for a in answers if a.status == 200]
    full = [a for a in answers if a.status == 503 and a.code == "QUEUE_FULL"]
    steps.info(f"answers: {summary(answers)}")
    steps.expect(
        "C4.2",
        "answered 200 (MAX_CONCURRENT + MAX_QUEUE)",
        observed=len(ok_answers),
        expected=concurrent + queue,
    )
    steps.expect(
        "C4.2", "rejected at once with 503 QUEUE_FULL", observed=len(full), expected=BURST_EXTRA
    )
    if full:
        _check_rejections(steps, full, ok_answers, queue)

    steps.section("C 4.3 metrics")
    after = target.metrics()
    expected_growth = (concurrent + queue, queue, BURST_EXTRA)
    for (name, labels), grow in zip(_COUNTERS, expected_growth, strict=True):
        grown = after.total(name, **labels) - before.total(name, **labels)
        shown_name = Sample(name, labels, 0).line().rsplit(" ", 1)[0]
        steps.expect(
            "C4.3", f"{shown_name} grew by {grow}", observed=f"+{grown:g}", expected=f"+{grow}"
        )
    _check_released(target, steps)


def _check_rejections(
    steps: Steps, full: Sequence[Answer], ok_answers: Sequence[Answer], queue: int
) -> None:
    retry_afters = sorted({a.retry_after or "-" for a in full})
    steps.check(
        "C4.2",
        "every 503 has Retry-After >= 1 s",
        all((a.retry_after or "").isdigit() and int(a.retry_after or 0) >= 1 for a in full),
        observed=f"Retry-After {', '.join(retry_afters)}",
        expected=">= 1",
    )
    text = f"Service temporarily unavailable: queue full ({queue}/{queue})"
    errors = sorted({a.error or "" for a in full})
    steps.expect(
        "C4.2", "the 503 body names the live limits", observed=" | ".join(errors), expected=text
    )
    if ok_answers:
        slowest_rejection = max(a.elapsed_s for a in full)
        fastest_answer = min(a.elapsed_s for a in ok_answers)
        steps.check(
            "C4.2",
            "rejections were immediate (before any admitted request finished)",
            slowest_rejection < fastest_answer,
            observed=f"slowest 503 {slowest_rejection:.2f} s, fastest 200 {fastest_answer:.2f} s",
            expected="slowest 503 < fastest 200",
        )


def _check_released(target: Target, steps: Steps, timeout_s: float = 5.0) -> None:
    """Every slot is free again once the burst is over (a slot released on every path)."""
    deadline = time.monotonic() + timeout_s
    state = target.client.bottleneck()
    # The last answer can reach us a moment before its slot is released: poll, bounded.
    while (state["running"] or state["queued"]) and time.monotonic() < deadline:
        time.sleep(0.05)
        state = target.client.bottleneck()
    steps.expect(
        "C4.3",
        "all slots released after the burst (GET /admin/bottleneck)",
        observed=f"running={state['running']} queued={state['queued']}",
        expected="running=0 queued=0",
    )


# ---------------------------------------------------------------------- command line


def connection_options() -> argparse.ArgumentParser:
    """`--url` and `--token`, shared with `rom-agent rollout`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=os.environ.get("BASE_URL") or os.environ.get("ROM_AGENT_URL") or DEFAULT_URL,
        help=f"service base URL (default: $BASE_URL, $ROM_AGENT_URL or {DEFAULT_URL})",
    )
    common.add_argument(
        "--token",
        help="admin token (default: $ADMIN_TOKEN; prefer the variable — arguments are "
        "visible in process lists and shell history)",
    )
    return common


def connect(args: argparse.Namespace, program: str) -> Target | None:
    """The target, or None after printing why not (no token, bad URL)."""
    token = args.token or os.environ.get("ADMIN_TOKEN")
    if not token:
        print(f"{program}: no admin token: set ADMIN_TOKEN or pass --token", file=sys.stderr)
        return None
    try:
        client = AdminClient(args.url, token)
    except ValueError as exc:
        print(f"{program}: {exc}", file=sys.stderr)
        return None
    if not is_local_or_tls(args.url):
        print(f"{program}: warning: sending the admin token over plain HTTP", file=sys.stderr)
    return Target(client, os.environ.get("ROM_AGENT_API_KEY") or None)


def add_validate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "feature", choices=("breaker", "bottleneck"), help="which guide stage to validate"
    )
    parser.add_argument(
        "--enable-drills",
        action="store_true",
        help=f"switch {FAULT_FLAG} on for the drill only, and off again afterwards",
    )
    parser.add_argument(
        "--delay-ms",
        type=int,
        default=DEFAULT_DELAY_MS,
        help="bottleneck burst: how long X-Fault holds each request when fault injection is "
        f"on (default {DEFAULT_DELAY_MS})",
    )


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `validate breaker|bottleneck` to the `rom-agent` command parser."""
    parser = commands.add_parser(
        "validate",
        parents=[connection_options()],
        help="run the staging guide's breaker or bottleneck checks against a service",
    )
    add_validate_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    program = f"validate-{'circuit-breaker' if args.feature == 'breaker' else 'bottleneck'}"
    target = connect(args, program)
    if target is None:
        return EXIT_USAGE
    steps = Steps()
    steps.info(f"{program} against {target.url}")
    if args.feature == "breaker":
        validate_breaker(target, steps, enable_drills=args.enable_drills)
    else:
        validate_bottleneck(target, steps, enable_drills=args.enable_drills, delay_ms=args.delay_ms)
    return finish(steps, program)


def finish(steps: Steps, program: str) -> int:
    passed = sum(check.outcome is Outcome.PASS for check in steps.checks)
    skipped = sum(check.outcome is Outcome.SKIP for check in steps.checks)
    failed = steps.failed
    steps.section("result")
    steps.info(f"{passed} passed, {len(failed)} failed, {skipped} skipped")
    for check in failed:
        steps.info(f"FAILED {check.step} {check.name}: observed {check.observed}")
    verdict = "PASSED" if steps.passed else "FAILED"
    steps.info(f"{program}: {verdict}")
    return EXIT_OK if steps.passed else EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rom_agent.ops.validate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[connection_options()],
    )
    add_validate_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
