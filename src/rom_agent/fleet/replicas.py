"""The replica registry: who is in the fleet, and in what state.

Each replica writes its state under its own key with a TTL every `HEARTBEAT_INTERVAL_S`, and
its id into one sorted set scored by that expiry, so the live replicas are one range read (a
replica killed with `kill -9` drops out within `TTL_S`). The last count seen is kept: admission
falls back to `ceil(global / that count)` per replica while Redis is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import orjson

from rom_agent.fleet.shared_state import SharedState, SharedStateDown

HEARTBEAT_INTERVAL_S = 1.0
TTL_S = 5.0


class ReplicaRegistry:
    def __init__(
        self,
        shared: SharedState,
        replica_id: str,
        describe: Callable[[], dict[str, Any]],
        *,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self._shared = shared
        self.replica_id = replica_id
        self._describe = describe
        self._wall_ms = wall_ms
        self._task: asyncio.Task[None] | None = None
        self.last_known_count = 1  # until the first heartbeat: this replica alone

    @property
    def _set_key(self) -> str:
        return self._shared.key("replicas")

    def _entry_key(self, replica_id: str) -> str:
        return self._shared.key("replica", replica_id)

    async def heartbeat(self) -> int:
        """Write our entry, drop expired ones; the number of live replicas."""
        now = self._wall_ms()
        expires = now + int(TTL_S * 1000)
        state = orjson.dumps({"id": self.replica_id, **self._describe(), "seenAtMs": now})
        entry_key, set_key = self._entry_key(self.replica_id), self._set_key

        async def write(redis: Any) -> int:
            async with redis.pipeline(transaction=True) as pipe:
                pipe.set(entry_key, state, px=int(TTL_S * 1000))
                pipe.zadd(set_key, {self.replica_id: expires})
                pipe.zremrangebyscore(set_key, "-inf", now)
                pipe.zcard(set_key)
                results = await pipe.execute()
            return int(results[-1])

        count = await self._shared.call("heartbeat", write, background=True)
        self.last_known_count = max(1, count)
        return count

    async def live(self) -> list[dict[str, Any]]:
        """Every live replica's last reported state, ordered by id."""
        now = self._wall_ms()
        set_key = self._set_key

        async def read(redis: Any) -> list[Any]:
            ids = await redis.zrangebyscore(set_key, now, "+inf")
            if not ids:
                return []
            keys = [self._entry_key(i.decode()) for i in ids]
            return list(await redis.mget(keys))

        raw = await self._shared.call("replicas", read, background=True)
        replicas = [orjson.loads(item) for item in raw if item is not None]
        return sorted(replicas, key=lambda r: r["id"])

    async def leave(self) -> None:
        """Remove our entry at a clean shutdown (best effort)."""
        entry_key, set_key = self._entry_key(self.replica_id), self._set_key

        async def remove(redis: Any) -> None:
            async with redis.pipeline(transaction=True) as pipe:
                pipe.delete(entry_key)
                pipe.zrem(set_key, self.replica_id)
                await pipe.execute()

        with contextlib.suppress(SharedStateDown):
            await self._shared.call("leave", remove, background=True)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(SharedStateDown):
                await self.heartbeat()
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.leave()
