"""The SQLite store: history windows, group commit, and closing."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from rom_agent.domain.messages import (
    Message,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
)
from rom_agent.store.conversations import SCHEMA, ConversationStore, trim_history
from rom_agent.store.database import Database, DatabaseClosedError


def user(text: str) -> Message:
    return Message.text("user", text)


def answer(text: str) -> Message:
    return Message.text("assistant", text)


def tool_turn(call_id: str, *, note: str = "") -> list[Message]:
    """A tool use and its results; `note` is text riding with the results (how older
    versions stored the nudge that ended tool use)."""
    results: tuple[TextBlock | ToolResultBlock, ...] = (ToolResultBlock(call_id, "4"),)
    if note:
        results += (TextBlock(note),)
    return [
        Message("assistant", (ToolUseBlock(call_id, "calcular", {"expressao": "2+2"}),)),
        Message("user", results),
    ]


def a_run(n: int, *, note: str = "") -> list[Message]:
    """One stored turn with tool use: user, tool use, results, answer."""
    return [user(f"pergunta {n}"), *tool_turn(f"t{n}", note=note), answer(f"resposta {n}")]


def assert_valid_window(window: list[Message]) -> None:
    """Starts at a user turn; every tool use is directly followed by all its results."""
    if not window:
        return
    first = window[0]
    assert first.role == "user" and first.plain_text
    assert not any(isinstance(b, ToolResultBlock) for b in first.content)
    for index, message in enumerate(window):
        uses = [b.id for b in message.content if isinstance(b, ToolUseBlock)]
        results = [b.tool_use_id for b in message.content if isinstance(b, ToolResultBlock)]
        if uses:
            following = window[index + 1].content
            assert [b.tool_use_id for b in following if isinstance(b, ToolResultBlock)] == uses
        if results:
            before = window[index - 1].content if index else ()
            assert [b.id for b in before if isinstance(b, ToolUseBlock)] == results


# --------------------------------------------------------------------------- trim_history


@pytest.mark.parametrize("note", ["", "Não chame mais ferramentas."])
@pytest.mark.parametrize("limit", range(1, 13))
def test_every_window_starts_at_a_user_turn_and_keeps_tool_pairs(note: str, limit: int) -> None:
    stored = a_run(1, note=note) + a_run(2, note=note) + a_run(3, note=note)
    window = trim_history(stored, limit)
    assert len(window) <= limit
    assert_valid_window(window)
    # The largest valid window: whole turns from the end.
    assert len(window) == 4 * (limit // 4)


def test_a_plain_history_is_cut_only_to_start_at_a_user_turn() -> None:
    stored = [user("a"), answer("b"), user("c"), answer("d"), user("e")]
    assert trim_history(stored, 5) == stored
    assert trim_history(stored, 4) == stored[2:]
    assert trim_history(stored, 1) == stored[4:]


# --------------------------------------------------------------------------- the store


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[Database]:
    db = Database(str(tmp_path / "store.db"), schema=SCHEMA)
    db.start()
    yield db
    await db.close()


async def test_history_read_back_is_a_valid_window(database: Database) -> None:
    store = ConversationStore(database)
    # Rows as an older version stored them: the nudge text next to the tool results.
    for n in range(3):
        await store.append("c", a_run(n, note="Não chame mais ferramentas."), model="m")
    for limit in range(1, 13):
        window = await store.history("c", limit)
        assert_valid_window(window)
        assert len(window) == 4 * (limit // 4)


async def test_a_failed_job_in_a_group_commit_leaves_nothing(database: Database) -> None:
    """Jobs committed together: one that fails after writing is rolled back to its savepoint,
    the others are committed."""
    await database.write(lambda c: c.execute("CREATE TABLE t (v TEXT)"))
    gate = threading.Event()

    def blocker(connection: sqlite3.Connection) -> None:
        gate.wait(10)  # holds the worker so the next jobs form one batch

    def failing(connection: sqlite3.Connection) -> None:
        connection.execute("INSERT INTO t VALUES ('failed')")
        raise ValueError("job failed after writing")

    def ok(value: str) -> Callable[[sqlite3.Connection], object]:
        return lambda connection: connection.execute("INSERT INTO t VALUES (?)", (value,))

    first = asyncio.ensure_future(database.write(blocker))
    batch = [database.write(ok("before")), database.write(failing), database.write(ok("after"))]
    gate.set()
    await first
    outcomes = await asyncio.gather(*batch, return_exceptions=True)

    assert isinstance(outcomes[1], ValueError)
    assert not isinstance(outcomes[0], BaseException)
    assert not isinstance(outcomes[2], BaseException)
    rows = await database.read(lambda c: c.execute("SELECT v FROM t ORDER BY rowid").fetchall())
    assert rows == [("before",), ("after",)]


# --------------------------------------------------------------------------- closing


async def test_a_write_submitted_while_closing_fails_fast(tmp_path: Path) -> None:
    db = Database(str(tmp_path / "store.db"), schema=SCHEMA)
    db.start()
    store = ConversationStore(db)
    queued = asyncio.ensure_future(store.append("c", [user("a"), answer("b")], model="m"))
    await asyncio.sleep(0)  # the append is queued before close starts
    closing = asyncio.ensure_future(db.close())
    await asyncio.sleep(0)  # close() has run up to its stop marker

    with pytest.raises(DatabaseClosedError, match="closing"):
        # A bound so that a regression fails instead of hanging the suite.
        await asyncio.wait_for(store.append("c", [user("c"), answer("d")], model="m"), 10)
    await asyncio.wait_for(closing, 10)
    await queued  # work queued before the close was finished, not dropped

    with pytest.raises(DatabaseClosedError):
        await db.write(lambda c: None)

    reopened = Database(str(tmp_path / "store.db"), schema=SCHEMA)
    reopened.start()
    try:
        stored = await ConversationStore(reopened).get("c")
    finally:
        await reopened.close()
    assert stored is not None and [m.to_dict()["content"] for m in stored] == ["a", "b"]


# --------------------------------------------------------------------------- stress


async def test_concurrent_writes_racing_a_close_all_resolve_and_match_the_disk(
    tmp_path: Path,
) -> None:
    """Writers on this loop and on another thread's loop, some jobs failing after writing,
    and a close in the middle. Invariants: every write resolves (no hang), a write that
    succeeded is on disk, a failed or refused one left nothing."""
    path = str(tmp_path / "stress.db")
    db = Database(path, schema="CREATE TABLE IF NOT EXISTS t (v TEXT PRIMARY KEY);")
    db.start()

    def insert(value: str, *, fail: bool) -> Callable[[sqlite3.Connection], object]:
        def job(connection: sqlite3.Connection) -> object:
            connection.execute("INSERT INTO t VALUES (?)", (value,))
            if fail:
                raise ValueError(value)
            return value

        return job

    async def writer(prefix: str, count: int, outcomes: dict[str, str]) -> None:
        async def one(i: int) -> None:
            value = f"{prefix}-{i}"
            try:
                await db.write(insert(value, fail=i % 7 == 3))
                outcomes[value] = "ok"
            except ValueError:
                outcomes[value] = "failed"
            except DatabaseClosedError:
                outcomes[value] = "refused"

        tasks = []
        for i in range(count):
            tasks.append(asyncio.ensure_future(one(i)))
            if i % 16 == 0:
                await asyncio.sleep(0)  # interleave with the worker and the close
        await asyncio.wait_for(asyncio.gather(*tasks), 30)

    other: dict[str, str] = {}
    other_started = threading.Event()

    def other_thread() -> None:
        async def main() -> None:
            other_started.set()
            await writer("other", 2000, other)

        asyncio.run(main())

    thread = threading.Thread(target=other_thread)
    thread.start()
    other_started.wait(10)
    mine: dict[str, str] = {}
    writing = asyncio.ensure_future(writer("main", 2000, mine))
    for _ in range(40):
        await asyncio.sleep(0)
    await asyncio.wait_for(db.close(), 30)
    await writing
    await asyncio.to_thread(thread.join, 30)
    assert not thread.is_alive()

    outcomes = {**mine, **other}
    assert len(outcomes) == 4000  # every write resolved, one way or another
    counts = Counter(outcomes.values())
    assert counts["refused"] > 0 and counts["ok"] > 0  # the close was mid-load
    with sqlite3.connect(path) as connection:
        stored = {row[0] for row in connection.execute("SELECT v FROM t")}
    assert stored == {value for value, outcome in outcomes.items() if outcome == "ok"}
