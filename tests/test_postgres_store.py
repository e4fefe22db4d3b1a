"""The PostgreSQL backend against a real server: migrations, conversations, flag overrides,
durability of 200'd turns and what a database outage does to a request."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from rom_agent.domain.messages import Message
from rom_agent.flag_changes import SET, AuditEntry
from rom_agent.flags import FlagStore, load_persisted_overrides
from rom_agent.store.backend import StoreBackend
from rom_agent.store.flag_overrides import PostgresFlagOverrides
from rom_agent.store.migrations import LATEST, MIGRATIONS, applied_versions, migrate
from rom_agent.store.postgres import PostgresConversationStore, create_pool
from tests.server import ServiceProcess, isolated_settings, running_app

TOKEN = secrets.token_urlsafe(32)
AUTH = {"X-Admin-Token": TOKEN}


@pytest.fixture
async def pool(pg_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(pg_url)
    async with pool.acquire() as connection:
        await migrate(connection)
    try:
        yield pool
    finally:
        await pool.close()


# ---------------------------------------------------------------------- migrations


async def test_migrations_apply_once_in_order_and_are_idempotent(pg_url: str) -> None:
    connection = await asyncpg.connect(pg_url)
    try:
        assert await migrate(connection) == [m.version for m in MIGRATIONS]
        assert await migrate(connection) == []
        assert await applied_versions(connection) == list(range(1, LATEST + 1))
    finally:
        await connection.close()


async def test_concurrent_migrations_serialise_on_the_advisory_lock(pg_url: str) -> None:
    connections = [await asyncpg.connect(pg_url) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in connections))
        applied = sorted(v for result in results for v in result)
        assert applied == list(range(1, LATEST + 1))  # each exactly once, nobody failed
        assert sum(1 for result in results if result) == 1
    finally:
        for connection in connections:
            await connection.close()


async def test_a_database_at_the_previous_version_is_upgraded_keeping_its_data(
    pg_url: str,
) -> None:
    connection = await asyncpg.connect(pg_url)
    try:
        assert await migrate(connection, target=LATEST - 1) == list(range(1, LATEST))
        await connection.execute(
            "INSERT INTO flag_overrides VALUES ('MAX_QUEUE', '7', now());"
            "INSERT INTO admin_audit (time, action, changes, client)"
            " VALUES (now(), 'set', '{}', '127.0.0.1')"
        )
        assert await migrate(connection) == [LATEST]
        version = await connection.fetchval("SELECT version FROM flag_state")
        assert version == 1  # the set action already audited counts as one change
        assert await connection.fetchval("SELECT value FROM flag_overrides") == "7"
    finally:
        await connection.close()


# ---------------------------------------------------------------------- conversations


async def test_conversations_round_trip_in_order(pool: asyncpg.Pool) -> None:
    store = PostgresConversationStore(pool)
    assert await store.get("nope") is None
    for i in range(3):
        await store.append(
            "c1",
            [Message.text("user", f"q{i}"), Message.text("assistant", f"a{i}")],
            model="rom-sim-1",
        )
    history = await store.history("c1", 4)
    assert [m.plain_text for m in history] == ["q1", "a1", "q2", "a2"]
    stored = await store.get("c1")
    assert stored is not None
    assert [(m.role, m.model) for m in stored[:2]] == [("user", None), ("assistant", "rom-sim-1")]
    assert stored[0].created_at.endswith("Z")
    assert await store.ping() > 0


# ---------------------------------------------------------------------- flag overrides


async def test_flag_changes_bump_the_version_and_are_audited_with_the_replica(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    persistence = PostgresFlagOverrides(pool, replica_id="replica-a")
    flags = FlagStore(isolated_settings(tmp_path))
    await load_persisted_overrides(flags, persistence)
    assert await persistence.snapshot() == (0, {})
    await flags.update({"MAX_QUEUE": 7, "ENABLE_BOTTLENECK": True}, client="1.2.3.4")
    await flags.remove("MAX_QUEUE", client="1.2.3.4")
    assert await persistence.snapshot() == (2, {"ENABLE_BOTTLENECK": "true"})
    (latest, first) = await persistence.history(10)
    assert latest.action == "unset"
    assert first.action == SET and first.changes["MAX_QUEUE"] == {"old": 20, "new": 7}
    replicas = await pool.fetch("SELECT replica FROM admin_audit ORDER BY id")
    assert [r["replica"] for r in replicas] == ["replica-a", "replica-a"]
    restored = FlagStore(isolated_settings(tmp_path))
    await load_persisted_overrides(restored, persistence)
    assert restored.current.enable_bottleneck is True


async def test_concurrent_saves_from_two_replicas_get_distinct_versions(
    pool: asyncpg.Pool,
) -> None:
    replicas = [PostgresFlagOverrides(pool, replica_id=f"r{i}") for i in range(2)]

    def entry(i: int) -> AuditEntry:
        return AuditEntry("2026-12-04T00:00:00.000Z", SET, {}, "test")

    versions = await asyncio.gather(
        *(
            replicas[i % 2].save(put={"MAX_QUEUE": str(i)}, delete=(), entry=entry(i))
            for i in range(20)
        )
    )
    assert sorted(versions) == list(range(1, 21))


# ---------------------------------------------------------------------- the service on PostgreSQL


def test_the_service_stores_turns_and_flags_in_postgresql(tmp_path: Path, pg_url: str) -> None:
    settings = isolated_settings(tmp_path, database_url=pg_url, admin_token=TOKEN)
    with running_app(settings) as app, app.client() as http:
        assert app.services.store.kind == "postgresql"
        first = http.post("/api/chat", json={"message": "hello pg"}).json()
        second = http.post(
            "/api/chat", json={"message": "again", "conversationId": first["conversationId"]}
        )
        assert second.status_code == 200
        stored = http.get(f"/api/conversations/{first['conversationId']}").json()
        assert [m["content"] for m in stored["messages"]][::2] == ["hello pg", "again"]
        assert http.patch("/admin/flags", json={"MAX_QUEUE": 3}, headers=AUTH).status_code == 200
        flags = http.get("/admin/flags", headers=AUTH).json()
        assert "postgresql://" in flags["flags"]["DATABASE_URL"]
        assert http.get("/ready").json()["checks"]["database"]["ok"] is True
    with running_app(isolated_settings(tmp_path, database_url=pg_url)) as again:
        assert again.services.flags.current.max_queue == 3  # restored from PostgreSQL


def test_a_password_in_database_url_is_never_shown(tmp_path: Path) -> None:
    settings = isolated_settings(
        tmp_path, database_url="postgresql://rom:<DATABASE_PASSWORD>@db.internal:5432/rom"
    )
    store = StoreBackend(settings.database_url)
    assert "<DATABASE_PASSWORD>" not in store.display
    from rom_agent.flag_changes import public_value

    assert public_value(settings.database_url) == "postgresql://rom:***@db.internal:5432/rom"


def test_every_200_turn_is_in_postgresql_after_kill_9(tmp_path: Path, pg_url: str) -> None:
    service = ServiceProcess({"DATABASE_URL": pg_url, "LOG_LEVEL": "warning"}, tmp_path).start()
    ids = []
    try:
        for i in range(20):
            response = httpx.post(service.url + "/api/chat", json={"message": f"durable {i}"})
            assert response.status_code == 200
            ids.append(response.json()["conversationId"])
    finally:
        service.kill()

    async def stored() -> dict[str, list[str]]:
        connection = await asyncpg.connect(pg_url)
        try:
            rows = await connection.fetch("SELECT conversation_id, role FROM messages ORDER BY id")
        finally:
            await connection.close()
        result: dict[str, list[str]] = {}
        for row in rows:
            result.setdefault(row["conversation_id"], []).append(row["role"])
        return result

    rows = asyncio.run(stored())
    assert all(rows[cid] == ["user", "assistant"] for cid in ids)


def test_with_the_database_unreachable_no_turn_gets_a_200(tmp_path: Path, pg_url: str) -> None:
    name = pg_url.rsplit("/", 1)[1]

    async def cut_off(allow: bool) -> None:
        from tests.engines import PG_ADMIN_URL

        connection = await asyncpg.connect(PG_ADMIN_URL)
        try:
            await connection.execute(
                f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allow).lower()}'
            )
            if not allow:
                await connection.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                    name,
                )
        finally:
            await connection.close()

    settings = isolated_settings(tmp_path, database_url=pg_url)
    with running_app(settings) as app, app.client() as http:
        assert http.post("/api/chat", json={"message": "before"}).status_code == 200
        asyncio.run(cut_off(False))
        try:
            during = http.post("/api/chat", json={"message": "during"})
            assert during.status_code >= 500
            assert "error" in during.json()
            ready = http.get("/ready")
            assert ready.status_code == 503
            assert ready.json()["checks"]["database"]["ok"] is False
        finally:
            asyncio.run(cut_off(True))
        # The pool reconnects by itself once the database is back.
        assert http.post("/api/chat", json={"message": "after"}).status_code == 200


def test_migrate_command_and_two_replicas_starting_at_once_on_an_empty_database(
    tmp_path: Path, pg_url: str
) -> None:
    env = {"DATABASE_URL": pg_url, "LOG_LEVEL": "warning"}
    replicas = [ServiceProcess(env, tmp_path) for _ in range(2)]
    errors: list[BaseException] = []

    def start(replica: ServiceProcess) -> None:
        try:
            replica.start(timeout=60)  # two cold starts at once on a busy machine
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(r,)) for r in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        for replica in replicas:
            assert httpx.post(replica.url + "/api/chat", json={"message": "hi"}).status_code == 200
    finally:
        for replica in replicas:
            replica.stop()
    migrated = subprocess.run(
        [sys.executable, "-m", "rom_agent", "migrate"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )
    assert migrated.returncode == 0, migrated.stderr
    assert "already at the latest schema version" in migrated.stdout
    assert "postgresql://" in migrated.stdout
