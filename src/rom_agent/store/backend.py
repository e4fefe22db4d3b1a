"""The storage backend chosen by DATABASE_URL: embedded SQLite (default) or PostgreSQL.

Both give the same guarantees to the rest of the service: a turn is committed before `append`
returns, flag overrides and their audit entry commit together, and the override set carries a
version number. Objects are built without I/O; `start()` opens connections (and, for
PostgreSQL, applies the migrations) inside the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, Protocol

from rom_agent.store.conversations import SCHEMA as CONVERSATIONS_SCHEMA
from rom_agent.store.conversations import ConversationStore, StoredMessage
from rom_agent.store.database import Database
from rom_agent.store.flag_overrides import (
    SQLITE_SCHEMA as FLAG_SCHEMA,
)
from rom_agent.store.flag_overrides import (
    PostgresFlagOverrides,
    SqliteFlagOverrides,
)

if TYPE_CHECKING:
    import asyncpg

    from rom_agent.domain.messages import Message

StoreKind = Literal["sqlite", "postgresql"]


class Conversations(Protocol):
    """What the chat service and the routes need from a conversation store."""

    async def history(self, conversation_id: str, limit: int) -> list[Message]: ...

    async def append(
        self, conversation_id: str, messages: Sequence[Message], *, model: str | None
    ) -> None: ...

    async def get(self, conversation_id: str) -> list[StoredMessage] | None: ...

    async def ping(self) -> float: ...


def kind_of(url: str) -> StoreKind:
    return "postgresql" if url.startswith(("postgresql://", "postgres://")) else "sqlite"


class _LazyConversations:
    """Forwards to the PostgreSQL store once the pool exists (built in `start()`)."""

    def __init__(self) -> None:
        self.target: Conversations | None = None

    def _require(self) -> Conversations:
        if self.target is None:
            raise RuntimeError("database is not running")
        return self.target

    async def history(self, conversation_id: str, limit: int) -> list[Message]:
        return await self._require().history(conversation_id, limit)

    async def append(
        self, conversation_id: str, messages: Sequence[Message], *, model: str | None
    ) -> None:
        await self._require().append(conversation_id, messages, model=model)

    async def get(self, conversation_id: str) -> list[StoredMessage] | None:
        return await self._require().get(conversation_id)

    async def ping(self) -> float:
        return await self._require().ping()


class StoreBackend:
    """Owns the connections; hands out the conversation store and the flag persistence."""

    def __init__(self, url: str, *, replica_id: str = "") -> None:
        self.url = url
        self.kind: StoreKind = kind_of(url)
        self._replica_id = replica_id
        self._sqlite: Database | None = None
        self._pool: asyncpg.Pool | None = None
        self._flag_overrides: SqliteFlagOverrides | PostgresFlagOverrides | None = None
        self.conversations: Conversations
        if self.kind == "sqlite":
            self._sqlite = Database(
                url.removeprefix("sqlite:///"), schema=CONVERSATIONS_SCHEMA + FLAG_SCHEMA
            )
            self.conversations = ConversationStore(self._sqlite)
            self._flag_overrides = SqliteFlagOverrides(self._sqlite)
        else:
            self._lazy = _LazyConversations()
            self.conversations = self._lazy

    @property
    def flag_overrides(self) -> SqliteFlagOverrides | PostgresFlagOverrides:
        if self._flag_overrides is None:
            raise RuntimeError("database is not running")
        return self._flag_overrides

    @property
    def pool(self) -> asyncpg.Pool | None:
        """The PostgreSQL pool (None with SQLite); fleet mode listens for flag changes on it."""
        return self._pool

    @property
    def display(self) -> str:
        """The URL without credentials, for logs."""
        if self.kind == "sqlite":
            return self.url
        rest = self.url.split("://", 1)[1]
        return "postgresql://" + rest.rsplit("@", 1)[-1]

    async def start(self) -> list[int]:
        """Open connections; for PostgreSQL apply pending migrations (their versions)."""
        if self._sqlite is not None:
            self._sqlite.start()
            return []
        from rom_agent.store.migrations import migrate
        from rom_agent.store.postgres import PostgresConversationStore, create_pool

        pool = await create_pool(self.url)
        try:
            async with pool.acquire() as connection:
                applied = await migrate(connection)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool
        self._lazy.target = PostgresConversationStore(pool)
        self._flag_overrides = PostgresFlagOverrides(pool, replica_id=self._replica_id)
        return applied

    async def close(self) -> None:
        if self._sqlite is not None:
            await self._sqlite.close()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
