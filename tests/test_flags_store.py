"""The flag store with its SQLite persistence: layering, validation, restore and audit."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog

from rom_agent.config import ConfigError, Settings
from rom_agent.flag_changes import parse_changes
from rom_agent.flags import FlagStore, load_persisted_overrides
from rom_agent.store.database import Database
from rom_agent.store.flag_overrides import SQLITE_SCHEMA, SqliteFlagOverrides
from tests.server import isolated_settings


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "flags.db"


@pytest.fixture
async def repository(db_path: Path) -> AsyncIterator[SqliteFlagOverrides]:
    database = Database(str(db_path), schema=SQLITE_SCHEMA)
    database.start()
    try:
        yield SqliteFlagOverrides(database)
    finally:
        await database.close()


async def restored_store(
    settings: Settings, repository: SqliteFlagOverrides, env_keys: frozenset[str] = frozenset()
) -> FlagStore:
    store = FlagStore(settings, env_keys=env_keys)
    await load_persisted_overrides(store, repository)
    return store


@pytest.fixture
async def store(tmp_path: Path, repository: SqliteFlagOverrides) -> FlagStore:
    return await restored_store(isolated_settings(tmp_path), repository)


def stored_rows(db_path: Path) -> dict[str, str]:
    with sqlite3.connect(db_path) as connection:
        return dict(connection.execute("SELECT key, value FROM flag_overrides").fetchall())


# ---------------------------------------------------------------------- layering and parsing


async def test_sources_follow_the_layers(tmp_path: Path, repository: SqliteFlagOverrides) -> None:
    settings = isolated_settings(tmp_path, max_queue=10)
    store = await restored_store(settings, repository, env_keys=frozenset({"max_queue"}))
    assert (store.source("max_queue"), store.current.max_queue) == ("env", 10)
    assert (store.source("max_concurrent"), store.current.max_concurrent) == ("default", 5)

    await store.update({"MAX_QUEUE": 20}, client="127.0.0.1")
    assert (store.source("max_queue"), store.current.max_queue) == ("runtime", 20)

    await store.remove("MAX_QUEUE", client="127.0.0.1")
    assert (store.source("max_queue"), store.current.max_queue) == ("env", 10)


@pytest.mark.parametrize(
    ("raw", "field", "expected"),
    [
        ({"ENABLE_BOTTLENECK": True}, "enable_bottleneck", True),
        ({"enable_bottleneck": "YES"}, "enable_bottleneck", True),
        ({"ENABLE_RETRY": "0"}, "enable_retry", False),
        ({"MAX_QUEUE": 20}, "max_queue", 20),
        ({"max_queue": " 20 "}, "max_queue", 20),
        ({"RETRY_BUDGET_RATIO": 0.5}, "retry_budget_ratio", 0.5),
        ({"CIRCUIT_BREAKER_COOLDOWN_S": "5"}, "circuit_breaker_cooldown_s", 5.0),
        ({"GUARDRAIL_MODE": "Dry-Run"}, "guardrail_mode", "dry-run"),
    ],
)
async def test_values_are_parsed_like_the_environment(
    store: FlagStore, raw: dict[str, Any], field: str, expected: object
) -> None:
    await store.update(raw, client="test")
    assert getattr(store.current, field) == expected


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({"MAX_QUEUE": True}, "MAX_QUEUE"),  # MAX_QUEUE=true is an error in the environment too
        ({"MAX_QUEUE": "abc"}, "MAX_QUEUE"),
        ({"MAX_QUEUE": -1}, "MAX_QUEUE"),
        ({"MAX_QUEUE": 2.5}, "MAX_QUEUE"),
        ({"MAX_QUEUE": None}, "MAX_QUEUE"),
        ({"MAX_QUEUE": [20]}, "MAX_QUEUE"),
        ({"ENABLE_RETRY": "on"}, "ENABLE_RETRY"),
        ({"GUARDRAIL_MODE": "loud"}, "GUARDRAIL_MODE"),
        ({"MODEL_CHAIN": "simulator/x"}, "MODEL_CHAIN"),
        ({"ADMIN_TOKEN": "x"}, "ADMIN_TOKEN"),
        ({"NOT_A_FLAG": 1}, "NOT_A_FLAG"),
        ({"MAX_QUEUE": 1, "max_queue": 2}, "MAX_QUEUE"),
        ({"MAX_QUEUE": 30, "MAX_CONCURRENT": 0}, "MAX_CONCURRENT"),  # all or nothing
        ({"GUARDRAIL_SOFT_LIMIT": 30}, "GUARDRAIL_HARD_LIMIT"),  # cross-field: hard >= soft
        ({}, "no flags"),
    ],
)
async def test_bad_changes_are_refused_naming_the_key_and_nothing_is_applied(
    store: FlagStore, db_path: Path, raw: dict[str, Any], named: str
) -> None:
    before = store.current
    with pytest.raises(ConfigError, match=named):
        await store.update(raw, client="test")
    assert store.current is before
    assert store.overrides == {}
    assert stored_rows(db_path) == {}
    assert await store.history(10) == []


async def test_related_keys_can_change_together(store: FlagStore) -> None:
    await store.update({"GUARDRAIL_SOFT_LIMIT": 30, "GUARDRAIL_HARD_LIMIT": 40}, client="t")
    assert (store.current.guardrail_soft_limit, store.current.guardrail_hard_limit) == (30, 40)


def test_refusals_never_echo_a_secret_value() -> None:
    with pytest.raises(ConfigError) as refused:
        parse_changes({"ADMIN_TOKEN": "do-not-echo-me"})
    assert "do-not-echo-me" not in str(refused.value)


async def test_listeners_see_a_change_at_once(store: FlagStore) -> None:
    seen: list[int] = []
    store.subscribe(lambda settings: seen.append(settings.max_concurrent))
    await store.update({"MAX_CONCURRENT": 7}, client="t")
    assert seen == [7]


async def test_a_failing_listener_does_not_block_the_others(store: FlagStore) -> None:
    seen: list[bool] = []

    def broken(_: Settings) -> None:
        raise RuntimeError("boom")

    store.subscribe(broken)
    store.subscribe(lambda settings: seen.append(settings.enable_bottleneck))
    await store.update({"ENABLE_BOTTLENECK": True}, client="t")
    assert seen == [True] and store.current.enable_bottleneck is True


async def test_concurrent_changes_never_combine_into_an_invalid_snapshot(store: FlagStore) -> None:
    # Each change is valid against the starting state (soft 12, hard 25), not together.
    results = await asyncio.gather(
        store.update({"GUARDRAIL_SOFT_LIMIT": 20}, client="a"),
        store.update({"GUARDRAIL_HARD_LIMIT": 15}, client="b"),
        return_exceptions=True,
    )
    assert isinstance(results[1], ConfigError)
    assert store.current.guardrail_hard_limit >= store.current.guardrail_soft_limit


async def test_update_without_persistence_fails_loudly(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="persistence"):
        await FlagStore(isolated_settings(tmp_path)).update({"MAX_QUEUE": 1}, client="t")


# ---------------------------------------------------------------------- persistence


async def test_overrides_survive_a_restart(tmp_path: Path, db_path: Path) -> None:
    settings = isolated_settings(tmp_path)
    database = Database(str(db_path), schema=SQLITE_SCHEMA)
    database.start()
    first = await restored_store(settings, SqliteFlagOverrides(database))
    await first.update({"ENABLE_CIRCUIT_BREAKER": "yes", "MAX_QUEUE": 20}, client="t")
    await database.close()
    # Stored as the environment would hold them, normalised.
    assert stored_rows(db_path) == {"ENABLE_CIRCUIT_BREAKER": "true", "MAX_QUEUE": "20"}

    database = Database(str(db_path), schema=SQLITE_SCHEMA)
    database.start()
    try:
        second = await restored_store(settings, SqliteFlagOverrides(database))
        assert second.current.enable_circuit_breaker is True
        assert second.current.max_queue == 20
        assert second.source("max_queue") == "runtime"
    finally:
        await database.close()


async def test_stale_persisted_overrides_are_skipped_never_fatal(
    tmp_path: Path, db_path: Path, repository: SqliteFlagOverrides
) -> None:
    with sqlite3.connect(db_path) as connection:
        connection.executemany(
            "INSERT INTO flag_overrides (key, value, updated_at) VALUES (?, ?, 'x')",
            [
                ("MAX_QUEUE", "-1"),  # out of range now
                ("HOST", "0.0.0.0"),  # not changeable at runtime
                ("NOT_A_FLAG", "1"),  # removed
                ("MAX_CONCURRENT", "7"),  # still fine
            ],
        )
    store = FlagStore(isolated_settings(tmp_path))
    with structlog.testing.capture_logs() as logs:
        skipped = await load_persisted_overrides(store, repository)

    assert skipped == ["HOST", "MAX_QUEUE", "NOT_A_FLAG"]
    assert store.current.max_concurrent == 7 and store.current.max_queue == 20
    warned = {e["key"] for e in logs if e["event"] == "persisted flag override skipped"}
    assert warned == {"HOST", "MAX_QUEUE", "NOT_A_FLAG"}
    assert stored_rows(db_path) == {"MAX_CONCURRENT": "7"}  # they do not come back next time
    (entry,) = await store.history(10)
    assert (entry.action, entry.client) == ("discard", "startup")
    assert entry.changes["MAX_QUEUE"] == {"old": "-1", "new": 20}


async def test_restore_accepts_related_overrides_in_any_order(
    tmp_path: Path, db_path: Path, repository: SqliteFlagOverrides
) -> None:
    # Below the default soft limit (12), the stored hard limit 5 is valid only with soft 3.
    with sqlite3.connect(db_path) as connection:
        connection.executemany(
            "INSERT INTO flag_overrides (key, value, updated_at) VALUES (?, ?, 'x')",
            [("GUARDRAIL_HARD_LIMIT", "5"), ("GUARDRAIL_SOFT_LIMIT", "3")],
        )
    store = FlagStore(isolated_settings(tmp_path))
    assert await load_persisted_overrides(store, repository) == []
    assert (store.current.guardrail_soft_limit, store.current.guardrail_hard_limit) == (3, 5)


# ---------------------------------------------------------------------- audit


async def test_every_change_is_audited_newest_first(store: FlagStore) -> None:
    await store.update({"MAX_QUEUE": 20, "ENABLE_BOTTLENECK": True}, client="10.0.0.7")
    await store.remove("max_queue", client="10.0.0.8")

    removed, changed = await store.history(10)
    assert changed.action == "set" and changed.client == "10.0.0.7"
    assert changed.changes == {
        "MAX_QUEUE": {"old": 20, "new": 20},  # pinned: the value did not change, the source did
        "ENABLE_BOTTLENECK": {"old": False, "new": True},
    }
    assert removed.action == "unset" and removed.client == "10.0.0.8"
    assert removed.changes == {"MAX_QUEUE": {"old": 20, "new": 20}}
    for entry in (removed, changed):
        when = datetime.fromisoformat(entry.time)
        assert entry.time.endswith("Z") and when.utcoffset() == timedelta(0)
    assert removed.id is not None and changed.id is not None and removed.id > changed.id
    assert [e.id for e in await store.history(1)] == [removed.id]


async def test_removing_a_key_without_override_is_none_and_not_audited(store: FlagStore) -> None:
    assert await store.remove("MAX_QUEUE", client="t") is None
    assert await store.remove("NOT_A_FLAG", client="t") is None
    assert await store.history(10) == []


async def test_breaker_actions_share_the_audit_log(store: FlagStore) -> None:
    await store.record(
        "breaker_open",
        {"state": {"old": "CLOSED", "new": "OPEN"}},
        client="127.0.0.1",
        target="rom-sim-1",
    )
    (entry,) = await store.history(10)
    assert entry.to_dict() == {
        "id": entry.id,
        "time": entry.time,
        "action": "breaker_open",
        "target": "rom-sim-1",
        "changes": {"state": {"old": "CLOSED", "new": "OPEN"}},
        "client": "127.0.0.1",
    }
