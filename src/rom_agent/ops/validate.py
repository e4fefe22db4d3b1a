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
import os
import sys
from collections.abc import Sequence

from rom_agent.ops.bottleneck_checks import DEFAULT_DELAY_MS, validate_bottleneck
from rom_agent.ops.breaker_checks import validate_breaker
from rom_agent.ops.client import DEFAULT_URL, AdminClient, is_local_or_tls
from rom_agent.ops.steps import EXIT_USAGE, Steps, finish
from rom_agent.ops.target import FAULT_FLAG, Target


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
