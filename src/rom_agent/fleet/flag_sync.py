"""Runtime flags across replicas: PostgreSQL holds them, Redis pub/sub says "look now".

A replica that commits a change publishes its new version on the fleet channel; every replica
subscribed to it re-reads the overrides from the database and installs them (well within a
second). Pub/sub loses messages silently (a reconnect, a killed connection, Redis down), so
every replica also re-reads the version number every `POLL_INTERVAL_S` from the database —
one indexed single-row read — and installs what it missed. Without Redis the poll alone keeps
replicas within that interval. The hot path still reads `flags.current`, one attribute.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import orjson
from redis.exceptions import RedisError

from rom_agent.flags import FlagStore
from rom_agent.fleet.shared_state import SharedState, SharedStateDown
from rom_agent.logs import get_logger

log = get_logger("rom_agent.fleet.flags")

POLL_INTERVAL_S = 2.0
RESUBSCRIBE_DELAY_S = 0.2  # after a failed (re)subscription, not after a dropped connection


class FlagSync:
    def __init__(
        self,
        flags: FlagStore,
        shared: SharedState | None,
        *,
        replica_id: str,
        poll_interval_s: float = POLL_INTERVAL_S,
        replicate_flags: bool = True,
    ) -> None:
        self._flags = flags
        self._shared = shared
        self._replica_id = replica_id
        self._poll_interval_s = poll_interval_s
        self._tasks: list[asyncio.Task[None]] = []
        self._publishing: set[asyncio.Task[bool]] = set()
        self._handlers: dict[str, Callable[[dict[str, Any]], None]] = {}
        self._refreshing: asyncio.Task[None] | None = None
        self._again = False
        self.subscribed = False
        self._replicate = replicate_flags  # False with SQLite: each replica has its own file
        if replicate_flags:
            flags.on_committed(self._publish_soon)

    @property
    def channel(self) -> str:
        assert self._shared is not None
        return self._shared.key("events")

    def handle(self, kind: str, handler: Callable[[dict[str, Any]], None]) -> None:
        """Route fleet events of `kind` (other than flag changes) to `handler`."""
        self._handlers[kind] = handler

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._replicate:
            self._tasks.append(loop.create_task(self._poll_loop()))
        if self._shared is not None:
            self._tasks.append(loop.create_task(self._subscribe_loop()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def publish(self, kind: str, body: dict[str, Any]) -> bool:
        """Best effort: False if Redis is down (peers catch up by polling)."""
        if self._shared is None:
            return False
        message = orjson.dumps({"kind": kind, "replica": self._replica_id, **body})
        channel = self.channel
        try:
            await self._shared.call(
                "publish", lambda r: r.publish(channel, message), background=True
            )
        except SharedStateDown:
            return False
        return True

    # ------------------------------------------------------------------ internals

    def _publish_soon(self, version: int) -> None:
        task = asyncio.get_running_loop().create_task(self.publish("flags", {"version": version}))
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    def _refresh_soon(self) -> None:
        # A notice arriving during a refresh may name a version that refresh already missed:
        # run once more after it instead of starting a second one alongside.
        self._again = True
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh_repeatedly())

    async def _refresh_repeatedly(self) -> None:
        while self._again:
            self._again = False
            await self._refresh()

    async def _refresh(self) -> None:
        try:
            await self._flags.refresh()
        except Exception as exc:  # database down: keep the last values, try at the next poll
            log.warning("flag refresh failed; keeping the last values", error=type(exc).__name__)

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval_s)
            await self._refresh()

    async def _subscribe_loop(self) -> None:
        assert self._shared is not None
        while True:
            client = self._shared.pubsub_client()
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self.subscribed = True
                if self._replicate:
                    self._refresh_soon()  # whatever was published while we were not listening
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._dispatch(message["data"])
            except (RedisError, OSError) as exc:
                if self.subscribed:
                    log.warning("fleet channel lost; resubscribing", error=type(exc).__name__)
                    self.subscribed = False
                else:
                    await asyncio.sleep(RESUBSCRIBE_DELAY_S)
            finally:
                self.subscribed = False
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                with contextlib.suppress(Exception):
                    await client.aclose()

    def _dispatch(self, data: bytes) -> None:
        try:
            event = orjson.loads(data)
            kind = event["kind"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("malformed fleet event ignored")
            return
        if kind == "flags":
            if self._replicate and int(event.get("version", 0)) > self._flags.version:
                self._refresh_soon()
            return
        handler = self._handlers.get(kind)
        if handler is not None:
            try:
                handler(event)
            except Exception:
                log.exception("fleet event handler failed", kind=kind)
