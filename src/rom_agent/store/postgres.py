"""Conversations in PostgreSQL (asyncpg), for several replicas sharing one history.

Same contract as `store.conversations.ConversationStore`: `append` returns once the turn is
committed (synchronous_commit is left at its default `on`, so a commit is on the server's disk),
which is what lets a 200 mean "stored". asyncpg was chosen over psycopg 3 by measurement
(docs/decisions.md, "Fleet mode").
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg
import orjson

from rom_agent.domain.messages import Message
from rom_agent.store.conversations import (
    StoredMessage,
    _decode_block,
    _encode_block,
    trim_history,
)

POOL_MAX_SIZE = 10
CONNECT_TIMEOUT_S = 5.0
# A statement that takes longer is treated as a database failure, not waited on forever.
COMMAND_TIMEOUT_S = 10.0


async def create_pool(url: str, *, max_size: int = POOL_MAX_SIZE) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        url,
        min_size=1,
        max_size=max_size,
        timeout=CONNECT_TIMEOUT_S,
        command_timeout=COMMAND_TIMEOUT_S,
    )
    assert pool is not None
    return pool


def _format_time(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class PostgresConversationStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def history(self, conversation_id: str, limit: int) -> list[Message]:
        rows = await self._pool.fetch(
            "SELECT role, content FROM ("
            " SELECT id, role, content FROM messages WHERE conversation_id = $1"
            " ORDER BY id DESC LIMIT $2) AS recent ORDER BY id",
            conversation_id,
            limit,
        )
        messages = [
            Message(row["role"], tuple(_decode_block(b) for b in orjson.loads(row["content"])))
            for row in rows
        ]
        return trim_history(messages, limit)

    async def append(
        self, conversation_id: str, messages: Sequence[Message], *, model: str | None
    ) -> None:
        """Store a whole turn atomically; returns once it is committed."""
        now = datetime.now(UTC)
        roles = [message.role for message in messages]
        contents = [
            orjson.dumps([_encode_block(block) for block in message.content]).decode()
            for message in messages
        ]
        models = [model if message.role == "assistant" else None for message in messages]
        # One statement, one round trip, one implicit transaction: the conversation row and
        # every message of the turn commit together (or not at all). `ordinality` keeps the
        # turn's order in the serial ids.
        await self._pool.execute(
            "WITH upsert AS ("
            " INSERT INTO conversations (id, created_at, updated_at) VALUES ($1, $2, $2)"
            " ON CONFLICT (id) DO UPDATE SET updated_at = excluded.updated_at RETURNING id)"
            " INSERT INTO messages (conversation_id, role, content, model, created_at)"
            " SELECT upsert.id, m.role, m.content, m.model, $2"
            " FROM upsert, unnest($3::text[], $4::jsonb[], $5::text[])"
            " WITH ORDINALITY AS m(role, content, model, n) ORDER BY m.n",
            conversation_id,
            now,
            roles,
            contents,
            models,
        )

    async def get(self, conversation_id: str) -> list[StoredMessage] | None:
        async with self._pool.acquire() as connection:
            exists = await connection.fetchval(
                "SELECT 1 FROM conversations WHERE id = $1", conversation_id
            )
            if exists is None:
                return None
            rows = await connection.fetch(
                "SELECT role, content, model, created_at FROM messages"
                " WHERE conversation_id = $1 ORDER BY id",
                conversation_id,
            )
        return [
            StoredMessage(
                row["role"],
                orjson.loads(row["content"]),
                row["model"],
                _format_time(row["created_at"]),
            )
            for row in rows
        ]

    async def ping(self) -> float:
        """Round trip to the server, in seconds (readiness check)."""
        started = time.perf_counter()
        await self._pool.fetchval("SELECT 1")
        return time.perf_counter() - started
