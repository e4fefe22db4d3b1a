"""The report of a validation run: numbered checks printed as `[PASS]`/`[FAIL]`/`[SKIP]` as
they happen (observed and expected values side by side), kept for a final summary or a report
file, and the run's exit status."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TextIO

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

Sleep = Callable[[float], None]


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
