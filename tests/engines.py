"""Real PostgreSQL and Redis for the integration and fleet tests.

Each test gets its own database (created and dropped here) and its own Redis key prefix, so
parallel runs on one machine never see each other's data. An engine that does not answer fails
the test under CI=true (CI requires both) and skips it LOUDLY elsewhere; conftest lists the
skipped tests at the end of the run.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import asyncpg
import pytest

PG_ADMIN_URL = os.environ.get("ROM_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("ROM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
MISSING_MARK = "ENGINE MISSING"


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 1
        ):
            return True
    except OSError:
        return False


def require(engine: str) -> None:
    """Fail (CI) or skip loudly (dev machine) when `engine` does not answer."""
    url, port = (PG_ADMIN_URL, 5432) if engine == "postgresql" else (REDIS_URL, 6379)
    if _reachable(url, port):
        return
    message = f"{MISSING_MARK}: {engine} at {urlsplit(url).netloc} does not answer"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (CI requires it)")
    pytest.skip(message + " — start it (see scripts/ensure_engines.sh) to run this test")


def database_url(name: str) -> str:
    parts = urlsplit(PG_ADMIN_URL)
    return parts._replace(path="/" + name).geturl()


async def _admin(statement: str) -> None:
    connection = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


def create_database() -> tuple[str, str]:
    """A new empty database; (name, url)."""
    name = f"rom_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    return name, database_url(name)


def drop_database(name: str) -> None:
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def pg_url() -> Iterator[str]:
    """The URL of a fresh, empty PostgreSQL database, dropped after the test."""
    require("postgresql")
    name, url = create_database()
    try:
        yield url
    finally:
        drop_database(name)


@pytest.fixture
def redis_url() -> str:
    require("redis")
    return REDIS_URL


@pytest.fixture
def key_prefix() -> str:
    """A Redis key prefix no other test run uses."""
    return f"romtest:{uuid.uuid4().hex[:10]}:"
