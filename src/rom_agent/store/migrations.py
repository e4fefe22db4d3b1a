"""Versioned PostgreSQL schema migrations, applied at startup and by `rom-agent migrate`.

Each migration is a numbered SQL script, applied once, in order, and recorded in
`schema_migrations`. Every run takes a transaction-scoped advisory lock first, so replicas
starting at the same moment queue behind each other: the first applies what is missing, the
others find nothing left to do. The whole run is one transaction (PostgreSQL DDL is
transactional), so a failed migration leaves the schema as it was.

Migrations only ever add (tables, columns with defaults, indexes), so a replica running the
previous release keeps working against the newer schema during a rolling deploy. A database
newer than this code is accepted with a warning for the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rom_agent.logs import get_logger

if TYPE_CHECKING:
    from typing import Any

    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    Connection = asyncpg.Connection[Any] | PoolConnectionProxy[Any]

log = get_logger("rom_agent.store.migrations")

# Any constant shared by every replica; the value spells "rom-agent" in ASCII hex.
ADVISORY_LOCK_KEY = 0x726F6D2D6167656E

SCHEMA_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    applied_at  TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "conversations",
        """
        CREATE TABLE conversations (
            id          TEXT PRIMARY KEY,
            created_at  TIMESTAMPTZ NOT NULL,
            updated_at  TIMESTAMPTZ NOT NULL
        );
        CREATE TABLE messages (
            id               BIGSERIAL PRIMARY KEY,
            conversation_id  TEXT NOT NULL REFERENCES conversations(id),
            role             TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
            content          JSONB NOT NULL,
            model            TEXT,
            created_at       TIMESTAMPTZ NOT NULL
        );
        CREATE INDEX messages_by_conversation ON messages (conversation_id, id);
        """,
    ),
    Migration(
        2,
        "runtime flag overrides and admin audit",
        """
        CREATE TABLE flag_overrides (
            key         TEXT PRIMARY KEY,
            value       TEXT NOT NULL,
            updated_at  TIMESTAMPTZ NOT NULL
        );
        CREATE TABLE admin_audit (
            id       BIGSERIAL PRIMARY KEY,
            time     TIMESTAMPTZ NOT NULL,
            action   TEXT NOT NULL,
            target   TEXT,
            changes  JSONB NOT NULL,
            client   TEXT NOT NULL
        );
        """,
    ),
    Migration(
        3,
        "flag version and the replica behind each admin action",
        """
        CREATE TABLE flag_state (
            id       INTEGER PRIMARY KEY CHECK (id = 1),
            version  BIGINT NOT NULL
        );
        INSERT INTO flag_state (id, version)
            SELECT 1, count(*) FROM admin_audit WHERE action IN ('set', 'unset', 'discard');
        ALTER TABLE admin_audit ADD COLUMN replica TEXT;
        """,
    ),
)

LATEST = MIGRATIONS[-1].version


async def applied_versions(connection: Connection) -> list[int]:
    exists = await connection.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return []
    rows = await connection.fetch("SELECT version FROM schema_migrations ORDER BY version")
    return [row["version"] for row in rows]


async def migrate(connection: Connection, *, target: int = LATEST) -> list[int]:
    """Apply every migration up to `target` not applied yet; the versions applied now."""
    applied_now: list[int] = []
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1)", ADVISORY_LOCK_KEY)
        await connection.execute(SCHEMA_TABLE)
        done = set(await applied_versions(connection))
        newer = sorted(version for version in done if version > LATEST)
        if newer:
            log.warning("database schema is newer than this release", versions=newer)
        for migration in MIGRATIONS:
            if migration.version in done or migration.version > target:
                continue
            await connection.execute(migration.sql)
            await connection.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
            applied_now.append(migration.version)
    if applied_now:
        log.info("database migrated", applied=applied_now, latest=LATEST)
    return applied_now
