"""rom-agent: a resilient LLM chat service (retries, circuit breakers, model fallback,
admission control behind feature flags).

Commands: `serve` runs the HTTP service (configuration from the environment and `.env`,
see docs/operations.md); `flags` reads and changes runtime flags through the admin API;
`validate` and `rollout` run the staging checks and the incremental rollout; `migrate`
prepares a PostgreSQL database."""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path

from rom_agent import __version__
from rom_agent.config import ConfigError, Settings, load_settings
from rom_agent.logs import configure_logging
from rom_agent.ops import flags_cli, migrate, rollout, validate
from rom_agent.store.backend import kind_of


def check_sqlite_path(settings: Settings) -> None:
    """An SQLite file the service cannot create or write is a configuration error, said in one
    line before anything starts (not a traceback from the store's thread)."""
    if kind_of(settings.database_url) != "sqlite" or settings.database_path == ":memory:":
        return
    path = Path(settings.database_path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sqlite3.connect(path).close()
        if not os.access(path, os.W_OK):
            raise PermissionError("file is read-only")
    except (OSError, sqlite3.Error) as exc:
        raise ConfigError(f"DATABASE_URL: cannot open {path} for writing: {exc}") from None


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
        check_sqlite_path(settings)
        services = create_services(settings)
    except (ConfigError, ValueError) as exc:
        print(f"rom-agent: {exc}", file=sys.stderr)
        return 2
    return run(settings, services)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rom-agent",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"rom-agent {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve_cmd = commands.add_parser("serve", help="run the HTTP service")
    serve_cmd.add_argument("--host", help="listen address (default: HOST or 127.0.0.1)")
    serve_cmd.add_argument("--port", type=int, help="listen port (default: PORT or 8000)")
    serve_cmd.set_defaults(handler=serve)

    flags_cli.register(commands)
    migrate.register(commands)
    rollout.register(commands)
    validate.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:  # Ctrl-C outside the server's own handling: no traceback
        print("rom-agent: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
