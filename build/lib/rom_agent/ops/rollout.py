"""`rom-agent rollout`: the staging guide's stages A → B → C through the runtime flag API.

    read -rs ADMIN_TOKEN && export ADMIN_TOKEN      # never on the command line
    rom-agent rollout --url https://<staging-host> \\
        [--max-concurrent 5] [--max-queue 20] [--burst-delay-ms 3000] \\
        [--report STAGING_VALIDATION_REPORT.md]

* Preflight: `/health` answers, the admin token is accepted, metrics are on.
* A: PATCH `MAX_CONCURRENT`/`MAX_QUEUE` (the guide's 5/20 unless overridden); GET shows them,
  with `ENABLE_CIRCUIT_BREAKER` and `ENABLE_BOTTLENECK` still false.
* B: PATCH `ENABLE_CIRCUIT_BREAKER=true`; the breaker cycle CLOSED → OPEN → HALF_OPEN → CLOSED
  and the fallback metrics (`ops.validate.validate_breaker`). Waits out the cooldown.
* C: PATCH `ENABLE_BOTTLENECK=true`; a burst of MAX_CONCURRENT + MAX_QUEUE + 5 requests held
  `--burst-delay-ms` each, exactly 5 rejected (`ops.validate.validate_bottleneck`).

Each stage is validated before the next starts. When any check of a stage fails (or the stage
is interrupted), that stage's flags are PATCHed back to the values they had before it, the
rollback is verified with a GET, and the rollout stops: NO-GO. `ENABLE_FAULT_INJECTION` is
switched on only for each drill and is off when the rollout ends, whatever happened.

`STAGING_VALIDATION_REPORT.md` lists every check with its observed and expected value, every
flag change, the rollbacks, the final flags and the verdict. Exit status: 0 GO, 1 NO-GO,
2 bad usage, 130 interrupted (report written, NO-GO).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from rom_agent import __version__
from rom_agent.ops.client import ApiCallError
from rom_agent.ops.validate import (
    DEFAULT_DELAY_MS,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    FAULT_FLAG,
    Outcome,
    Sleep,
    Steps,
    Target,
    connect,
    connection_options,
    describe,
    shown,
    validate_bottleneck,
    validate_breaker,
)

REPORT_NAME = "STAGING_VALIDATION_REPORT.md"
GUIDE_MAX_CONCURRENT, GUIDE_MAX_QUEUE = 5, 20  # the guide's stage A values (= code defaults)
EXIT_INTERRUPTED = 130
FINAL_KEYS = (
    "ENABLE_RETRY",
    "ENABLE_CIRCUIT_BREAKER",
    "ENABLE_BOTTLENECK",
    "ENABLE_GUARDRAILS",
    "ENABLE_METRICS",
    "ENABLE_FAULT_INJECTION",
    "CIRCUIT_BREAKER_THRESHOLD",
    "CIRCUIT_BREAKER_COOLDOWN_S",
    "MAX_CONCURRENT",
    "MAX_QUEUE",
    "QUEUE_TIMEOUT_S",
    "MAX_RETRIES",
    "GUARDRAIL_MODE",
    "MODEL_CHAIN",
)


@dataclass(frozen=True, slots=True)
class Plan:
    max_concurrent: int = GUIDE_MAX_CONCURRENT
    max_queue: int = GUIDE_MAX_QUEUE
    burst_delay_ms: int = DEFAULT_DELAY_MS


@dataclass
class Context:
    target: Target
    plan: Plan
    out: TextIO
    sleep: Sleep = time.sleep


StageBody = Callable[[Context, Steps], None]


@dataclass(frozen=True, slots=True)
class Stage:
    key: str
    title: str
    flags: tuple[str, ...]  # what this stage changes, and rolls back on failure
    body: StageBody


@dataclass
class StageRun:
    stage: Stage
    steps: Steps
    status: str = "not run"  # passed | failed | not run
    seconds: float = 0.0
    rollback: Steps | None = None

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass
class Rollout:
    url: str
    plan: Plan
    started: str
    runs: list[StageRun] = field(default_factory=list)
    preflight: Steps | None = None
    final: Steps | None = None
    final_flags: dict[str, Any] = field(default_factory=dict)
    final_sources: dict[str, str] = field(default_factory=dict)
    version: str = "?"
    finished: str = ""
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def go(self) -> bool:
        sections = [self.preflight, *(run.steps for run in self.runs), self.final]
        return (
            not self.interrupted
            and bool(self.runs)
            and all(run.passed for run in self.runs)
            and all(steps is not None and steps.passed for steps in sections)
        )


# ---------------------------------------------------------------------- stages


def _stage_a(ctx: Context, steps: Steps) -> None:
    plan, target = ctx.plan, ctx.target
    steps.section("A 2 align the bottleneck parameters")
    limits = {"MAX_CONCURRENT": plan.max_concurrent, "MAX_QUEUE": plan.max_queue}
    target.set_flags(limits, steps, "stage A")
    steps.section("A 4 validate (GET /admin/flags)")
    flags = target.flags()
    for key, value in limits.items():
        steps.expect("A4", f"{key} is {value}", observed=shown(flags[key]), expected=value)
    for key in ("ENABLE_CIRCUIT_BREAKER", "ENABLE_BOTTLENECK"):
        steps.expect("A4", f"{key} still false", observed=shown(flags[key]), expected="false")


def _stage_b(ctx: Context, steps: Steps) -> None:
    target = ctx.target
    steps.section("B 1 switch the circuit breaker on")
    target.set_flags({"ENABLE_CIRCUIT_BREAKER": True}, steps, "stage B")
    flags = target.flags()
    steps.expect(
        "B1",
        "ENABLE_BOTTLENECK still false",
        observed=shown(flags["ENABLE_BOTTLENECK"]),
        expected="false",
    )
    validate_breaker(target, steps, enable_drills=True, drills_always_off=True, sleep=ctx.sleep)


def _stage_c(ctx: Context, steps: Steps) -> None:
    target = ctx.target
    steps.section("C 1 switch the bottleneck on")
    target.set_flags({"ENABLE_BOTTLENECK": True}, steps, "stage C")
    flags = target.flags()
    steps.expect(
        "C1",
        "ENABLE_CIRCUIT_BREAKER still true",
        observed=shown(flags["ENABLE_CIRCUIT_BREAKER"]),
        expected="true",
    )
    validate_bottleneck(
        target,
        steps,
        enable_drills=True,
        drills_always_off=True,
        delay_ms=ctx.plan.burst_delay_ms,
    )


STAGES = (
    Stage("A", "Align the bottleneck parameters", ("MAX_CONCURRENT", "MAX_QUEUE"), _stage_a),
    Stage("B", "Circuit breaker", ("ENABLE_CIRCUIT_BREAKER",), _stage_b),
    Stage("C", "Bottleneck", ("ENABLE_BOTTLENECK",), _stage_c),
)


# ---------------------------------------------------------------------- running


def run_rollout(
    ctx: Context, stages: Sequence[Stage] = STAGES, *, clock: Callable[[], float] = time.monotonic
) -> Rollout:
    """Preflight, then each stage until one fails, then the final state. Never raises for a
    failed check or an unreachable service; Ctrl-C rolls the current stage back and ends the
    rollout (`interrupted`, NO-GO)."""
    began = clock()
    result = Rollout(url=display_url(ctx.target.url), plan=ctx.plan, started=_now())
    result.runs = [StageRun(stage, Steps(ctx.out)) for stage in stages]
    try:
        if _preflight(ctx, result):
            for run in result.runs:
                if not _run_stage(ctx, run, clock):
                    break
    except KeyboardInterrupt:
        result.interrupted = True
        print("\ninterrupted: the stage in progress was rolled back", file=ctx.out, flush=True)
    _final_state(ctx, result)
    result.finished = _now()
    result.seconds = clock() - began
    return result


def _preflight(ctx: Context, result: Rollout) -> bool:
    steps = result.preflight = Steps(ctx.out)
    steps.section("Preflight")
    target = ctx.target
    try:
        health = target.client.request("GET", "/health")
        steps.expect("P", "GET /health answers 200", observed=health.status, expected=200)
        if health.ok:
            result.version = str(health.json().get("version", "?"))
        reply = target.client.request("GET", "/admin/flags", admin=True)
        if not steps.expect(
            "P", "admin token accepted (GET /admin/flags)", observed=describe(reply), expected="200"
        ):
            return False
        flags = reply.json()["flags"]
        steps.expect(
            "P",
            "ENABLE_METRICS is true (checks read /metrics)",
            observed=shown(flags["ENABLE_METRICS"]),
            expected="true",
        )
        for key in (
            "ENABLE_CIRCUIT_BREAKER",
            "ENABLE_BOTTLENECK",
            "MAX_CONCURRENT",
            "MAX_QUEUE",
            FAULT_FLAG,
        ):
            steps.info(f"before: {key}={shown(flags[key])}")
    except ApiCallError as exc:
        steps.check("P", "the service answers", False, observed=str(exc), expected="an answer")
    return steps.passed


def _run_stage(ctx: Context, run: StageRun, clock: Callable[[], float]) -> bool:
    stage, steps = run.stage, run.steps
    print(f"\n=== Stage {stage.key}: {stage.title}", file=ctx.out, flush=True)
    began = clock()
    finished = False
    previous: dict[str, Any] = {}
    try:
        flags = ctx.target.flags()
        previous = {key: flags[key] for key in stage.flags}
        stage.body(ctx, steps)
        finished = True
    except Exception as exc:
        # An unreachable service, an API error, or a defect here: the stage is not validated,
        # so it is rolled back and reported like any failed check.
        if not isinstance(exc, ApiCallError):
            traceback.print_exc()
        observed = str(exc) if isinstance(exc, ApiCallError) else f"{type(exc).__name__}: {exc}"
        steps.check(
            stage.key, "stage ran to the end", False, observed=observed, expected="no error"
        )
        finished = True
    finally:
        # Also on Ctrl-C: a stage that was not validated does not stay on.
        run.status = "passed" if finished and steps.passed else "failed"
        if not run.passed and previous:
            run.rollback = _roll_back(ctx, previous)
        run.seconds = clock() - began
    print(f"=== Stage {stage.key}: {run.status.upper()}", file=ctx.out, flush=True)
    return run.passed


def _roll_back(ctx: Context, previous: Mapping[str, Any]) -> Steps:
    steps = Steps(ctx.out)
    steps.section("rollback")
    try:
        now = ctx.target.flags()
        # Only what differs: a PATCH of an unchanged value would still pin it as a runtime
        # override and add an audit entry.
        changed = {key: value for key, value in previous.items() if now[key] != value}
        if changed:
            ctx.target.set_flags(changed, steps, "rollback")
            now = ctx.target.flags()
        for key, value in previous.items():
            steps.expect(
                "R",
                f"{key} back to {shown(value)}",
                observed=shown(now[key]),
                expected=shown(value),
            )
    except ApiCallError as exc:
        wanted = ", ".join(f"{key}={shown(value)}" for key, value in previous.items())
        steps.check("R", f"rollback to {wanted}", False, observed=str(exc), expected="applied")
        steps.info(f"ROLL BACK BY HAND: rom-agent flags set {wanted.replace(',', '')}")
    return steps


def _final_state(ctx: Context, result: Rollout) -> None:
    steps = result.final = Steps(ctx.out)
    steps.section("Final state")
    target = ctx.target
    try:
        view = target.client.get_flags()
        if view["flags"][FAULT_FLAG] is not False:
            # Drills switch it off themselves; this covers a rollout stopped before them.
            target.set_flags({FAULT_FLAG: False}, steps, "rollout over")
            view = target.client.get_flags()
    except ApiCallError as exc:
        steps.check("F", "final flags read", False, observed=str(exc), expected="read")
        return
    flags = view["flags"]
    result.final_flags = {key: flags[key] for key in FINAL_KEYS if key in flags}
    result.final_sources = {key: view["sources"].get(key, "?") for key in result.final_flags}
    steps.expect("F", f"{FAULT_FLAG} is false", observed=shown(flags[FAULT_FLAG]), expected="false")
    if all(run.passed for run in result.runs):
        # The guide's "Status final" checklist.
        expected = {
            "ENABLE_RETRY": True,
            "ENABLE_CIRCUIT_BREAKER": True,
            "ENABLE_BOTTLENECK": True,
            "ENABLE_GUARDRAILS": False,
            "ENABLE_METRICS": True,
            "MAX_CONCURRENT": ctx.plan.max_concurrent,
            "MAX_QUEUE": ctx.plan.max_queue,
        }
        for key, value in expected.items():
            steps.expect(
                "F", f"{key}={shown(value)}", observed=shown(flags[key]), expected=shown(value)
            )


# ---------------------------------------------------------------------- report


def render_report(result: Rollout) -> str:
    verdict = "GO" if result.go else "NO-GO"
    lines = [
        "# Staging validation report",
        "",
        f"**Verdict: {verdict}** — {_verdict_reason(result)}",
        "",
        "| | |",
        "|---|---|",
        f"| Service | {result.url} (rom-agent {result.version}) |",
        f"| Started | {result.started} |",
        f"| Finished | {result.finished} ({result.seconds:.1f} s) |",
        f"| Parameters | MAX_CONCURRENT={result.plan.max_concurrent}, "
        f"MAX_QUEUE={result.plan.max_queue}, burst delay {result.plan.burst_delay_ms} ms |",
        f"| Generated by | `rom-agent rollout` {__version__} |",
        "",
        "## Summary",
        "",
        "| Stage | Result | Checks passed | Time | Flag changes | Rolled back |",
        "|---|---|---|---|---|---|",
        _summary_row(
            "Preflight", result.preflight, "passed" if _ok(result.preflight) else "failed"
        ),
    ]
    for run in result.runs:
        lines.append(_stage_row(run))
    lines.append(
        _summary_row("Final state", result.final, "passed" if _ok(result.final) else "failed")
    )
    lines += ["", *_outcome_bullets(result), ""]
    sections = [("Preflight", result.preflight)]
    for run in result.runs:
        if run.status != "not run":
            sections.append((f"Stage {run.stage.key} — {run.stage.title}", run.steps))
            if run.rollback is not None:
                sections.append((f"Stage {run.stage.key} — rollback", run.rollback))
    sections.append(("Final state", result.final))
    for title, steps in sections:
        lines += _section(title, steps)
    lines += _final_flags(result)
    return "\n".join(lines) + "\n"


def _ok(steps: Steps | None) -> bool:
    return steps is not None and steps.passed


def _verdict_reason(result: Rollout) -> str:
    if result.go:
        return (
            "stages A, B and C validated, every check passed. The guide still asks for 24 h of "
            "stable staging (metrics, logs) before the production decision."
        )
    if not _ok(result.preflight) and not result.interrupted:
        return "the preflight failed; no flag was changed."
    for run in result.runs:
        if run.status == "failed":
            failed = "; ".join(f"{c.step} {c.name}" for c in run.steps.failed)
            cause = "was interrupted" if result.interrupted else f"failed ({failed})"
            return f"stage {run.stage.key} {cause}; {_rollback_outcome(run)}; later stages not run."
    if result.interrupted:
        return "the rollout was interrupted before any stage changed a flag."
    failed = "; ".join(f"{c.step} {c.name}" for c in result.final.failed) if result.final else ""
    return f"the final state is wrong ({failed or 'final flags unreadable'})."


def _rollback_outcome(run: StageRun) -> str:
    flags = ", ".join(run.stage.flags)
    if run.rollback is not None and run.rollback.passed:
        return f"{flags} rolled back"
    return f"ROLLBACK NOT CONFIRMED: check {flags} by hand (rom-agent flags get)"


def _summary_row(title: str, steps: Steps | None, status: str) -> str:
    checks = _count(steps)
    actions = "<br>".join(_md(a) for a in steps.actions) if steps else ""
    return f"| {title} | {_status(status)} | {checks} | — | {actions or '—'} | — |"


def _stage_row(run: StageRun) -> str:
    stage = run.stage
    if run.status == "not run":
        return f"| {stage.key}. {stage.title} | {_status('not run')} | — | — | — | — |"
    actions = "<br>".join(_md(a) for a in run.steps.actions) or "—"
    rolled = "<br>".join(_md(a) for a in run.rollback.actions) if run.rollback else "—"
    return (
        f"| {stage.key}. {stage.title} | {_status(run.status)} | {_count(run.steps)} | "
        f"{run.seconds:.1f} s | {actions} | {rolled or '—'} |"
    )


def _status(status: str) -> str:
    return {"passed": "✅ passed", "failed": "❌ failed"}.get(status, "⏸️ not run")


def _count(steps: Steps | None) -> str:
    if steps is None:
        return "—"
    ran = [c for c in steps.checks if c.outcome is not Outcome.SKIP]
    passed = sum(c.outcome is Outcome.PASS for c in ran)
    skipped = len(steps.checks) - len(ran)
    return f"{passed}/{len(ran)}" + (f" ({skipped} skipped)" if skipped else "")


def _outcome_bullets(result: Rollout) -> list[str]:
    by_key = {run.stage.key: run for run in result.runs}

    def mark(key: str) -> str:
        run = by_key.get(key)
        status = run.status if run is not None else "not run"
        return {"passed": "✅", "failed": "❌"}.get(status, "⏸️")

    guardrails = result.final_flags.get("ENABLE_GUARDRAILS")
    drills_off = result.final_flags.get(FAULT_FLAG) is False
    return [
        f"- {mark('A')} Bottleneck parameters aligned "
        f"(MAX_CONCURRENT={result.plan.max_concurrent}, MAX_QUEUE={result.plan.max_queue})",
        f"- {mark('B')} Circuit breaker on and validated: CLOSED → OPEN → HALF_OPEN → CLOSED, "
        "fallback metrics present",
        f"- {mark('C')} Bottleneck on and validated: burst of MAX_CONCURRENT + MAX_QUEUE + 5, "
        "exactly 5 rejected 503 QUEUE_FULL",
        f"- {'✅' if drills_off else '❌'} Fault injection off at the end "
        f"({FAULT_FLAG}={shown(result.final_flags.get(FAULT_FLAG, '?'))})",
        f"- {'⏸️' if guardrails is False else '⚠️'} Guardrails still off, as the guide plans "
        f"(ENABLE_GUARDRAILS={shown(guardrails)})",
    ]


def _section(title: str, steps: Steps | None) -> list[str]:
    lines = ["", f"## {title}", ""]
    if steps is None:
        return [*lines, "Not run."]
    if steps.actions:
        lines += ["Flag changes:", "", *(f"- {_md(action)}" for action in steps.actions), ""]
    lines += ["| Step | Check | Result | Observed | Expected |", "|---|---|---|---|---|"]
    for check in steps.checks:
        lines.append(
            f"| {check.step} | {_md(check.name)} | {check.outcome} | {_code(check.observed)} | "
            f"{_code(check.expected)} |"
        )
    return lines


def _final_flags(result: Rollout) -> list[str]:
    lines = ["", "## Final flags (GET /admin/flags)", ""]
    if not result.final_flags:
        return [*lines, "Could not be read."]
    lines += ["| Flag | Value | Source |", "|---|---|---|"]
    for key, value in result.final_flags.items():
        lines.append(f"| {key} | {_code(shown(value))} | {result.final_sources.get(key, '?')} |")
    return lines


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    return f"`{_md(text)}`" if text and text != "-" else "—"


# ---------------------------------------------------------------------- command line


def display_url(url: str) -> str:
    """The URL without credentials, query or fragment (the report is shared)."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.hostname or ""
    if ":" in netloc:  # IPv6
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `rollout` to the `rom-agent` command parser."""
    parser = commands.add_parser(
        "rollout",
        parents=[connection_options()],
        help="run the staging guide's stages A → B → C, validate each, write the report",
    )
    parser.add_argument(
        "--max-concurrent",
        type=int,
        default=GUIDE_MAX_CONCURRENT,
        help=f"stage A value (default {GUIDE_MAX_CONCURRENT}, the guide's)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=GUIDE_MAX_QUEUE,
        help=f"stage A value (default {GUIDE_MAX_QUEUE}, the guide's)",
    )
    parser.add_argument(
        "--burst-delay-ms",
        type=int,
        default=DEFAULT_DELAY_MS,
        help=f"stage C: how long X-Fault holds each burst request (default {DEFAULT_DELAY_MS})",
    )
    parser.add_argument(
        "--report", type=Path, default=Path(REPORT_NAME), help=f"default ./{REPORT_NAME}"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    if not args.report.parent.is_dir():
        print(f"rom-agent rollout: no directory for --report {args.report}", file=sys.stderr)
        return EXIT_USAGE
    target = connect(args, "rom-agent rollout")
    if target is None:
        return EXIT_USAGE
    plan = Plan(args.max_concurrent, args.max_queue, args.burst_delay_ms)
    ctx = Context(target, plan, out or sys.stdout)
    result = run_rollout(ctx)
    args.report.write_text(render_report(result), encoding="utf-8")
    verdict = "GO" if result.go else "NO-GO"
    print(f"\n{verdict}: report written to {args.report}", file=ctx.out, flush=True)
    if result.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if result.go else EXIT_FAILED
