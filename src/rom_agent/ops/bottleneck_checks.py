"""The staging guide's stage C checks: a burst of MAX_CONCURRENT + MAX_QUEUE + 5 simultaneous
requests gets exactly MAX_CONCURRENT + MAX_QUEUE answers and 5 immediate 503 QUEUE_FULL
rejections (limits read from /admin/flags), the bottleneck counters grow by exactly that, and
every slot is free afterwards. With fault injection each request is held by `X-Fault:
delay_ms`, so the burst is deterministic whatever the provider's speed."""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import TextIO

from rom_agent.ops.client import ApiCallError, error_of
from rom_agent.ops.steps import Steps, shown
from rom_agent.ops.target import FAULT_FLAG, OPERATION, Sample, Samples, Target, drills

BURST_EXTRA = 5  # the guide: 30 requests against 5 + 20 ⇒ exactly 5 rejected
DEFAULT_DELAY_MS = 3000
MAX_BURST = 1000


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
