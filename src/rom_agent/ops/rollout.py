"""`rom-agent rollout`: the staging guide's stages A → B → C through the runtime flag API.

    read -rs ADMIN_TOKEN && export ADMIN_TOKEN      # never on the command line
    rom-agent rollout --url https://<staging-host> \\
        [--max-concurrent 5] [--max-queue 20] [--burst-delay-ms 3000] \\
        [--report STAGING_VALIDATION_REPORT.md]

* Preflight: `/health` answers, the admin token is accepted, a chat is answered (the chat
  routes' API key: `ROM_AGENT_API_KEY`, when the service has `API_KEYS`), metrics are on.
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO, cast

from rom_agent.ops.bottleneck_checks import DEFAULT_DELAY_MS, validate_bottleneck
from rom_agent.ops.breaker_checks import validate_breaker
from rom_agent.ops.client import ApiCallError
from rom_agent.ops.rollout_feed import ServiceFeed, feed_enabled
from rom_agent.ops.rollout_model import (
    GUIDE_MAX_CONCURRENT,
    GUIDE_MAX_QUEUE,
    Context,
    Plan,
    Rollout,
    Stage,
    StageRun,
)
from rom_agent.ops.rollout_report import render_report
from rom_agent.ops.steps import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Steps, shown
from rom_agent.ops.target import FAULT_FLAG, Target, describe
from rom_agent.ops.validate import connect, connection_options

REPORT_NAME = "STAGING_VALIDATION_REPORT.md"
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
        _check_chat_route(target, steps)
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


def _check_chat_route(target: Target, steps: Steps) -> None:
    """Every drill talks to POST /api/chat: refused for want of an API key, it would fail in
    the middle of stage B, after a flag was flipped. Any answer of the route itself passes
    (a failing model is what the stages then examine)."""
    reply = target.chat("Teste preflight do rollout", "rollout-preflight")
    expected = "an answer of the route (not 401/403/404)"
    if reply.status == 401:
        expected = (
            "200: ROM_AGENT_API_KEY is not one of the service's API_KEYS"
            if target.has_api_key
            else "200: the service requires an API key; export ROM_AGENT_API_KEY"
        )
    steps.check(
        "P",
        "chat route reachable with our API key (POST /api/chat)",
        reply.status not in (401, 403, 404),
        observed=describe(reply),
        expected=expected,
    )


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
    out = out or sys.stdout
    # The service's console watches this rollout live (best effort, never blocks it).
    feed = ServiceFeed(out, target.client) if feed_enabled() else None
    ctx = Context(target, plan, cast(TextIO, feed) if feed is not None else out)
    result = run_rollout(ctx)
    report = render_report(result)
    args.report.write_text(report, encoding="utf-8")
    verdict = "GO" if result.go else "NO-GO"
    print(f"\n{verdict}: report written to {args.report}", file=ctx.out, flush=True)
    if feed is not None:
        feed.report(report)
    if result.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if result.go else EXIT_FAILED
