"""`rom-agent migrate`: bring the database named by DATABASE_URL to this release's schema.

The service applies the same migrations at startup; this command lets a deploy run them as a
separate step first (a release command). Safe to run while replicas are starting or serving:
migrations are serialised by an advisory lock and only ever add. Exit status: 0 done,
1 the database could not be migrated, 2 bad configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from rom_agent.config import ConfigError, load_settings
from rom_agent.store.backend import StoreBackend


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `migrate` to the `rom-agent` command parser."""
    migrate = commands.add_parser(
        "migrate", help="apply pending database schema migrations (DATABASE_URL) and exit"
    )
    migrate.set_defaults(handler=run)


async def _migrate(url: str) -> list[int]:
    store = StoreBackend(url)
    try:
        return await store.start()
    finally:
        await store.close()


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"rom-agent: {exc}", file=sys.stderr)
        return 2
    store = StoreBackend(settings.database_url)
    try:
        applied = asyncio.run(_migrate(settings.database_url))
    except Exception as exc:  # reported, not a traceback: this runs in deploy pipelines
        print(f"rom-agent migrate: {store.display}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if store.kind == "sqlite":
        print(f"{store.display}: schema is current (SQLite creates missing tables at start)")
    elif applied:
        print(f"{store.display}: applied migrations {', '.join(map(str, applied))}")
    else:
        print(f"{store.display}: already at the latest schema version")
    return 0
