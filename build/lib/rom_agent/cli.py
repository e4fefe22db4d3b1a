"""`rom-agent` command line: serve, and (later) operator tooling."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rom_agent import __version__
from rom_agent.config import ConfigError, load_settings
from rom_agent.logs import configure_logging
from rom_agent.ops import flags_cli, rollout, validate


def serve(args: argparse.Namespace) -> int:
    from rom_agent.app import create_services
    from rom_agent.server import run

    overrides = {}
    if args.host:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    try:
        settings = load_settings(**overrides)
        configure_logging(settings.log_level, settings.log_format)
        services = create_services(settings)
    except (ConfigError, ValueError) as exc:
        print(f"rom-agent: {exc}", file=sys.stderr)
        return 2
    run(settings, services)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rom-agent", description=__doc__)
    parser.add_argument("--version", action="version", version=f"rom-agent {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve_cmd = commands.add_parser("serve", help="run the HTTP service")
    serve_cmd.add_argument("--host", help="listen address (default: HOST or 127.0.0.1)")
    serve_cmd.add_argument("--port", type=int, help="listen port (default: PORT or 8000)")
    serve_cmd.set_defaults(handler=serve)

    flags_cli.register(commands)
    rollout.register(commands)
    validate.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
