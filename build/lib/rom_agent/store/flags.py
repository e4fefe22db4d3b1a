"""Runtime flag overrides and the admin audit log, in SQLite.

Overrides are stored the way the environment holds them (`MAX_QUEUE` → `"20"`), so restoring
them at startup parses them with exactly the environment's rules. The audit log is append-only.
Implements `flags.FlagPersistence`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Mapping

import orjson

from rom_agent.flags import AuditEntry
from rom_agent.store.database import Database

SCHEMA = """
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
"""


class FlagRepository:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def load(self) -> dict[str, str]:
        def job(connection: sqlite3.Connection) -> dict[str, str]:
            rows = connection.execute("SELECT key, value FROM flag_overrides ORDER BY key")
            return dict(rows.fetchall())

        return await self._db.read(job)

    async def save(
        self, *, put: Mapping[str, str], delete: Collection[str], entry: AuditEntry
    ) -> None:
        """The override changes and their audit entry, committed together."""

        def job(connection: sqlite3.Connection) -> None:
            connection.executemany(
                "INSERT INTO flag_overrides (key, value, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT(key) DO UPDATE SET"
                " value = excluded.value, updated_at = excluded.updated_at",
                [(key, value, entry.time) for key, value in put.items()],
            )
            connection.executemany(
                "DELETE FROM flag_overrides WHERE key = ?", [(key,) for key in delete]
            )
            _append(connection, entry)

        await self._db.write(job)

    async def record(self, entry: AuditEntry) -> None:
        await self._db.write(lambda connection: _append(connection, entry))

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


def _append(connection: sqlite3.Connection, entry: AuditEntry) -> None:
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
