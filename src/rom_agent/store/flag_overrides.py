"""Runtime flag overrides, their version number and the admin audit log: SQLite and PostgreSQL.

Overrides are stored the way the environment holds them (`MAX_QUEUE` → `"20"`), so restoring
them parses them with exactly the environment's rules. The audit log is append-only. Every
change of the override set bumps one version number in the same transaction, so a replica can
tell with one cheap read whether its copy is current (fleet mode re-reads it every few
seconds because pub/sub notifications can be lost). Both classes implement
`flag_changes.FlagPersistence`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson

from rom_agent.flag_changes import AuditEntry
from rom_agent.store.database import Database

if TYPE_CHECKING:
    import asyncpg

SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS flag_overrides (
    key         TEXT PRIMARY KEY,
    value       TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS admin_audit (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    time     TEXT NOT NULL,
    action   TEXT NOT NULL,
    target   TEXT,
    changes  TEXT NOT NULL,
    client   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS flag_state (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    version  INTEGER NOT NULL
);
INSERT OR IGNORE INTO flag_state (id, version) VALUES (1, 0);
"""


class SqliteFlagOverrides:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def load(self) -> dict[str, str]:
        return (await self.snapshot())[1]

    async def snapshot(self) -> tuple[int, dict[str, str]]:
        def job(connection: sqlite3.Connection) -> tuple[int, dict[str, str]]:
            rows = connection.execute("SELECT key, value FROM flag_overrides ORDER BY key")
            version = connection.execute("SELECT version FROM flag_state").fetchone()[0]
            return int(version), dict(rows.fetchall())

        return await self._db.read(job)

    async def version(self) -> int:
        def job(connection: sqlite3.Connection) -> int:
            return int(connection.execute("SELECT version FROM flag_state").fetchone()[0])

        return await self._db.read(job)

    async def save(
        self, *, put: Mapping[str, str], delete: Collection[str], entry: AuditEntry
    ) -> int:
        """The override changes and their audit entry, committed together; the new version."""

        def job(connection: sqlite3.Connection) -> int:
            connection.executemany(
                "INSERT INTO flag_overrides (key, value, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT(key) DO UPDATE SET"
                " value = excluded.value, updated_at = excluded.updated_at",
                [(key, value, entry.time) for key, value in put.items()],
            )
            connection.executemany(
                "DELETE FROM flag_overrides WHERE key = ?", [(key,) for key in delete]
            )
            _sqlite_append(connection, entry)
            connection.execute("UPDATE flag_state SET version = version + 1")
            return int(connection.execute("SELECT version FROM flag_state").fetchone()[0])

        return await self._db.write(job)

    async def record(self, entry: AuditEntry) -> None:
        await self._db.write(lambda connection: _sqlite_append(connection, entry))

    async def history(self, limit: int) -> list[AuditEntry]:
        def job(connection: sqlite3.Connection) -> list[AuditEntry]:
            rows = connection.execute(
                "SELECT id, time, action, target, changes, client FROM admin_audit"
                " ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
            return [
                AuditEntry(
                    id=row[0],
                    time=row[1],
                    action=row[2],
                    target=row[3],
                    changes=orjson.loads(row[4]),
                    client=row[5],
                )
                for row in rows
            ]

        return await self._db.read(job)


def _sqlite_append(connection: sqlite3.Connection, entry: AuditEntry) -> None:
    connection.execute(
        "INSERT INTO admin_audit (time, action, target, changes, client) VALUES (?, ?, ?, ?, ?)",
        (
            entry.time,
            entry.action,
            entry.target,
            orjson.dumps(entry.changes).decode(),
            entry.client,
        ),
    )


class PostgresFlagOverrides:
    """The same contract on PostgreSQL (tables from `store.migrations`)."""

    def __init__(self, pool: asyncpg.Pool, *, replica_id: str = "") -> None:
        self._pool = pool
        self._replica_id = replica_id

    async def load(self) -> dict[str, str]:
        return (await self.snapshot())[1]

    async def snapshot(self) -> tuple[int, dict[str, str]]:
        async with (
            self._pool.acquire() as connection,
            connection.transaction(isolation="repeatable_read", readonly=True),
        ):
            version = await connection.fetchval("SELECT version FROM flag_state")
            rows = await connection.fetch("SELECT key, value FROM flag_overrides ORDER BY key")
        return int(version), {row["key"]: row["value"] for row in rows}

    async def version(self) -> int:
        return int(await self._pool.fetchval("SELECT version FROM flag_state"))

    async def save(
        self, *, put: Mapping[str, str], delete: Collection[str], entry: AuditEntry
    ) -> int:
        at = _parse_time(entry.time)
        async with self._pool.acquire() as connection, connection.transaction():
            # The version row is locked first, so concurrent changes from two replicas are
            # applied one after the other and each gets its own version number.
            version = await connection.fetchval(
                "UPDATE flag_state SET version = version + 1 RETURNING version"
            )
            if put:
                await connection.executemany(
                    "INSERT INTO flag_overrides (key, value, updated_at) VALUES ($1, $2, $3)"
                    " ON CONFLICT (key) DO UPDATE SET"
                    " value = excluded.value, updated_at = excluded.updated_at",
                    [(key, value, at) for key, value in put.items()],
                )
            if delete:
                await connection.execute(
                    "DELETE FROM flag_overrides WHERE key = ANY($1::text[])", list(delete)
                )
            await self._append(connection, entry)
        return int(version)

    async def record(self, entry: AuditEntry) -> None:
        async with self._pool.acquire() as connection:
            await self._append(connection, entry)

    async def history(self, limit: int) -> list[AuditEntry]:
        rows = await self._pool.fetch(
            "SELECT id, time, action, target, changes, client FROM admin_audit"
            " ORDER BY id DESC LIMIT $1",
            limit,
        )
        return [
            AuditEntry(
                id=row["id"],
                time=_format_time(row["time"]),
                action=row["action"],
                target=row["target"],
                changes=orjson.loads(row["changes"]),
                client=row["client"],
            )
            for row in rows
        ]

    async def _append(self, connection: Any, entry: AuditEntry) -> None:
        await connection.execute(
            "INSERT INTO admin_audit (time, action, target, changes, client, replica)"
            " VALUES ($1, $2, $3, $4, $5, $6)",
            _parse_time(entry.time),
            entry.action,
            entry.target,
            orjson.dumps(entry.changes).decode(),
            entry.client,
            self._replica_id or None,
        )


def _parse_time(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


def _format_time(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
