"""Conversations: every stored message of every conversation, in order."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from rom_agent.domain.messages import (
    ContentBlock,
    Message,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
)
from rom_agent.store.database import Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id          TEXT PRIMARY KEY,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id  TEXT NOT NULL REFERENCES conversations(id),
    role             TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content          TEXT NOT NULL,
    model            TEXT,
    created_at       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation_id, id);
"""


def _encode_block(block: ContentBlock) -> dict[str, Any]:
    if isinstance(block, TextBlock):
        return {"type": "text", "text": block.text}
    if isinstance(block, ToolUseBlock):
        return {"type": "toolUse", "id": block.id, "name": block.name, "input": block.input}
    return {
        "type": "toolResult",
        "toolUseId": block.tool_use_id,
        "content": block.content,
        "isError": block.is_error,
    }


def _decode_block(data: dict[str, Any]) -> ContentBlock:
    kind = data["type"]
    if kind == "text":
        return TextBlock(data["text"])
    if kind == "toolUse":
        return ToolUseBlock(data["id"], data["name"], data["input"])
    return ToolResultBlock(data["toolUseId"], data["content"], data.get("isError", False))


@dataclass(frozen=True, slots=True)
class StoredMessage:
    role: str
    content: list[dict[str, Any]]
    model: str | None
    created_at: str

    def to_dict(self) -> dict[str, Any]:
        text = "".join(b["text"] for b in self.content if b["type"] == "text")
        return {
            "role": self.role,
            "content": text,
            "blocks": self.content,
            "model": self.model,
            "createdAt": self.created_at,
        }


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def is_user_turn(message: Message) -> bool:
    """A message the user wrote: text and no tool results (those travel in `user` messages
    too, but belong to the assistant turn before them)."""
    return (
        message.role == "user"
        and bool(message.plain_text)
        and not any(isinstance(block, ToolResultBlock) for block in message.content)
    )


def trim_history(messages: Sequence[Message], limit: int) -> list[Message]:
    """The last `limit` messages at most, starting at a user turn.

    A window that began with a tool result or an assistant turn would be rejected by the
    providers (OpenAI: a first message of role `tool`; Bedrock: a toolResult without its
    toolUse). Starting at a user turn also keeps every tool use with its result: a stored turn
    is whole (user turn … final answer), so a window cut at a turn boundary splits no pair.
    """
    window = messages[-limit:] if limit > 0 else ()
    for start, message in enumerate(window):
        if is_user_turn(message):
            return list(window[start:])
    return []


class ConversationStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def history(self, conversation_id: str, limit: int) -> list[Message]:
        def job(connection: sqlite3.Connection) -> list[Message]:
            rows = connection.execute(
                "SELECT role, content FROM ("
                " SELECT id, role, content FROM messages WHERE conversation_id = ?"
                " ORDER BY id DESC LIMIT ?) ORDER BY id",
                (conversation_id, limit),
            ).fetchall()
            return [
                Message(role, tuple(_decode_block(b) for b in orjson.loads(content)))
                for role, content in rows
            ]

        return trim_history(await self._db.read(job), limit)

    async def append(
        self, conversation_id: str, messages: Sequence[Message], *, model: str | None
    ) -> None:
        """Store a whole turn atomically; returns once it is committed."""
        now = _now_iso()
        rows = [
            (
                conversation_id,
                message.role,
                orjson.dumps([_encode_block(block) for block in message.content]).decode(),
                model if message.role == "assistant" else None,
                now,
            )
            for message in messages
        ]

        def job(connection: sqlite3.Connection) -> None:
            connection.execute(
                "INSERT INTO conversations (id, created_at, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT(id) DO UPDATE SET updated_at = excluded.updated_at",
                (conversation_id, now, now),
            )
            connection.executemany(
                "INSERT INTO messages (conversation_id, role, content, model, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                rows,
            )

        await self._db.write(job)

    async def get(self, conversation_id: str) -> list[StoredMessage] | None:
        def job(connection: sqlite3.Connection) -> list[StoredMessage] | None:
            exists = connection.execute(
                "SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)
            ).fetchone()
            if exists is None:
                return None
            rows = connection.execute(
                "SELECT role, content, model, created_at FROM messages"
                " WHERE conversation_id = ? ORDER BY id",
                (conversation_id,),
            ).fetchall()
            return [StoredMessage(r[0], orjson.loads(r[1]), r[2], r[3]) for r in rows]

        return await self._db.read(job)

    async def ping(self) -> float:
        """Round trip to the database thread, in seconds (readiness check)."""
        started = time.perf_counter()
        await self._db.read(lambda connection: connection.execute("SELECT 1").fetchone())
        return time.perf_counter() - started
