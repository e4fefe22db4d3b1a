"""What the service promises to have stored before it says so.

* A 200 from `/api/chat` means the turn is committed: checked by holding SQLite's write lock
  from outside (a stalled disk, for the service), sending a turn, and `kill -9`-ing the service
  while the lock is still held. Whatever the client was told must match what is on disk after
  the kill; an answer sent before the commit would be a 200 for a turn that is not there.
* A runtime flag is in force only once it is persisted: never while its write is pending,
  never when that write fails.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Collection, Mapping
from pathlib import Path

import httpx
import pytest

from rom_agent.flag_changes import AuditEntry
from rom_agent.flags import FlagStore
from tests.server import ServiceProcess, isolated_settings


def env_for(tmp_path: Path) -> dict[str, str]:
    return {"DATABASE_URL": f"sqlite:///{tmp_path / 'rom.db'}", "LOG_LEVEL": "warning"}


def test_a_200_is_sent_only_after_the_turn_is_committed(tmp_path: Path) -> None:
    service = ServiceProcess(env_for(tmp_path), tmp_path).start()
    try:
        before = httpx.post(service.url + "/api/chat", json={"message": "antes"}, timeout=30)
        assert before.status_code == 200  # the schema exists; this turn is committed
        locker = sqlite3.connect(tmp_path / "rom.db", isolation_level=None, timeout=0)
        locker.execute("BEGIN IMMEDIATE")  # SQLite's one write lock, held by the test
        try:
            body = {"message": "durante", "conversationId": "locked"}
            during = httpx.post(service.url + "/api/chat", json=body, timeout=60)
            service.kill()  # kill -9 while the service still cannot commit anything
        finally:
            locker.rollback()
            locker.close()
    finally:
        if service.process is not None and service.process.poll() is None:
            service.kill()

    # What is on disk after the kill (SQLite replays the WAL on open).
    with sqlite3.connect(tmp_path / "rom.db") as connection:
        stored = dict(
            connection.execute(
                "SELECT conversation_id, count(*) FROM messages GROUP BY conversation_id"
            ).fetchall()
        )
    assert stored.get(before.json()["conversationId"]) == 2
    # The client's view and the disk agree: a 200 only for a stored turn.
    assert (during.status_code == 200) == ("locked" in stored), during.text
    assert during.status_code >= 500  # the commit could not happen while the lock was held


class HeldPersistence:
    """Flag persistence whose save waits for the test, then succeeds or fails."""

    def __init__(self, *, fail: bool = False) -> None:
        self.fail = fail
        self.saving = asyncio.Event()
        self.release = asyncio.Event()
        self.saved: list[Mapping[str, str]] = []

    async def load(self) -> dict[str, str]:
        return {}

    async def save(
        self, *, put: Mapping[str, str], delete: Collection[str], entry: AuditEntry
    ) -> None:
        self.saving.set()
        await self.release.wait()
        if self.fail:
            raise sqlite3.OperationalError("disk I/O error")
        self.saved.append(dict(put))

    async def record(self, entry: AuditEntry) -> None:
        return None

    async def history(self, limit: int) -> list[AuditEntry]:
        return []


async def test_a_flag_is_in_force_only_once_persisted(tmp_path: Path) -> None:
    store = FlagStore(isolated_settings(tmp_path))
    persistence = HeldPersistence()
    store.attach(persistence)
    assert store.current.enable_guardrails is False

    update = asyncio.ensure_future(store.update({"ENABLE_GUARDRAILS": True}, client="test"))
    await persistence.saving.wait()
    assert store.current.enable_guardrails is False  # not durable yet: not in force
    persistence.release.set()
    await update

    assert persistence.saved == [{"ENABLE_GUARDRAILS": "true"}]
    assert store.current.enable_guardrails is True


async def test_a_flag_that_fails_to_persist_is_not_in_force(tmp_path: Path) -> None:
    store = FlagStore(isolated_settings(tmp_path))
    persistence = HeldPersistence(fail=True)
    persistence.release.set()
    store.attach(persistence)

    with pytest.raises(sqlite3.OperationalError):
        await store.update({"ENABLE_GUARDRAILS": True}, client="test")
    assert store.current.enable_guardrails is False
    assert "enable_guardrails" not in store.overrides
