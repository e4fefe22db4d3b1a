"""Breakers across replicas: operator overrides and hints are shared; breaker state is not.

Each replica's breakers decide alone (Hystrix, resilience4j, Envoy and Kong chose the same: a
shared breaker is a new failure mode). Two things do cross replicas, through Redis:

* **Operator overrides** — `POST /admin/breakers/{model}/open|close|reset` on any replica is
  stored in `<p>breaker:overrides` (hash, model → JSON with the replica that set it and an
  optional expiry) and announced on the fleet channel; every replica applies it within a second
  and re-reads the hash every `RESYNC_INTERVAL_S` (pub/sub loses messages). An expired force
  open/close returns the breaker to normal (CLOSED) on every replica.
* **Hints** — when a breaker here trips on consecutive failures (a provider-wide signal), a hint
  with the cooldown as TTL is written to `<p>breaker:hint:<model>` and announced. A peer whose
  breaker for that model is CLOSED moves it to HALF_OPEN: at most the half-open number of
  probes reach the model, the rest go straight to the fallback; a successful probe closes it.
  Each hint is applied once per replica. Trips are noticed by looking at the local breakers
  every `WATCH_INTERVAL_S` (no hook into the breaker's hot path).

Redis down: overrides already applied stay; new ones apply only on the replica that took the
request; hints are ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from rom_agent.fleet.shared_state import SharedState, SharedStateDown
from rom_agent.logs import get_logger

if TYPE_CHECKING:
    from rom_agent.flags import FlagStore
    from rom_agent.fleet.flag_sync import FlagSync
    from rom_agent.resilience.breaker import BreakerRegistry

log = get_logger("rom_agent.fleet.breakers")

RESYNC_INTERVAL_S = 2.0
WATCH_INTERVAL_S = 0.2
_ACTIONS = {"open": "force_open", "close": "force_close", "reset": "reset"}


class BreakerSync:
    def __init__(
        self,
        shared: SharedState,
        breakers: BreakerRegistry,
        flags: FlagStore,
        replica_id: str,
        *,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._shared = shared
        self._breakers = breakers
        self._flags = flags
        self._replica_id = replica_id
        self._wall = wall
        self._sync: FlagSync | None = None
        self.overrides: dict[str, dict[str, Any]] = {}  # model → override applied here
        self.hints: dict[str, dict[str, Any]] = {}  # model → live hint seen here
        self._expiry: dict[str, asyncio.TimerHandle] = {}
        self._generations: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def attach(self, sync: FlagSync) -> None:
        self._sync = sync
        sync.handle("breaker", self._on_override_event)
        sync.handle("hint", self._on_hint_event)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._resync_loop()))
        self._tasks.append(loop.create_task(self._watch_loop()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for handle in self._expiry.values():
            handle.cancel()

    # ------------------------------------------------------------------ overrides

    async def publish_override(
        self, model: str, action: str, *, client: str, expires_in_s: float | None
    ) -> dict[str, Any] | None:
        """Share an operator action taken here; the override record (None for reset)."""
        now = self._wall()
        record = None
        if action != "reset":
            record = {
                "action": action,
                "replica": self._replica_id,
                "client": client,
                "at": round(now, 3),
                "expiresAt": round(now + expires_in_s, 3) if expires_in_s else None,
            }
            self._install(model, record)
        else:
            self._forget(model)
        key = self._shared.key("breaker", "overrides")
        value = orjson.dumps(record) if record else None

        async def write(redis: Any) -> None:
            if value is None:
                await redis.hdel(key, model)
            else:
                await redis.hset(key, model, value)

        try:
            await self._shared.call("breaker_override", write, background=True)
        except SharedStateDown:
            log.warning("breaker override applies to this replica only: Redis is down")
        if self._sync is not None:
            await self._sync.publish(
                "breaker", {"model": model, "action": action, "record": record}
            )
        return record

    def _on_override_event(self, event: dict[str, Any]) -> None:
        if event.get("replica") == self._replica_id:
            return
        model, action = str(event["model"]), str(event["action"])
        if action == "reset":
            self._apply(model, "reset")
            self._forget(model)
        elif isinstance(event.get("record"), dict):
            self._accept(model, event["record"])

    def _accept(self, model: str, record: dict[str, Any]) -> None:
        if self.overrides.get(model) == record:
            return
        expires = record.get("expiresAt")
        if expires is not None and expires <= self._wall():
            return
        self._apply(model, str(record["action"]))
        self._install(model, record)

    def _install(self, model: str, record: dict[str, Any]) -> None:
        self.overrides[model] = record
        if model in self._expiry:
            self._expiry.pop(model).cancel()
        expires = record.get("expiresAt")
        if expires is not None:
            delay = max(0.0, float(expires) - self._wall())
            self._expiry[model] = asyncio.get_running_loop().call_later(
                delay, self._expire, model, record
            )

    def _expire(self, model: str, record: dict[str, Any]) -> None:
        if self.overrides.get(model) is not record:
            return
        del self.overrides[model]
        self._expiry.pop(model, None)
        self._apply(model, "close")  # back to normal operation
        log.info("breaker override expired", model=model, action=record["action"])

    def _forget(self, model: str) -> None:
        self.overrides.pop(model, None)
        handle = self._expiry.pop(model, None)
        if handle is not None:
            handle.cancel()

    def _apply(self, model: str, action: str) -> None:
        if self._breakers.find(model) is None and model not in self._known_models():
            return  # a model this replica does not serve (another release's chain)
        getattr(self._breakers, _ACTIONS[action])(model)
        self._generations[model] = self._breakers.get(model).generation

    def _known_models(self) -> set[str]:
        return {entry.split("/", 1)[1] for entry in self._flags.current.model_chain}

    # ------------------------------------------------------------------ hints

    def _on_hint_event(self, event: dict[str, Any]) -> None:
        if event.get("replica") != self._replica_id and isinstance(event.get("hint"), dict):
            self._accept_hint(str(event["model"]), event["hint"])

    def _accept_hint(self, model: str, hint: dict[str, Any]) -> None:
        if float(hint["expiresAt"]) <= self._wall() or self.hints.get(model) == hint:
            return
        self.hints[model] = hint
        breaker = self._breakers.find(model)
        why = f"hint from {hint['replica']}: {hint['reason']}"
        if breaker is not None and model not in self.overrides and breaker.hint_half_open(why):
            self._generations[model] = breaker.generation

    async def _publish_hint(self, model: str, reason: str) -> None:
        ttl_s = self._flags.current.circuit_breaker_cooldown_s
        hint = {
            "replica": self._replica_id,
            "reason": reason,
            "at": round(self._wall(), 3),
            "expiresAt": round(self._wall() + ttl_s, 3),
        }
        self.hints[model] = hint
        key = self._shared.key("breaker", "hint", model)
        value = orjson.dumps(hint)
        with contextlib.suppress(SharedStateDown):
            await self._shared.call(
                "breaker_hint",
                lambda r: r.set(key, value, px=int(ttl_s * 1000)),
                background=True,
            )
        if self._sync is not None:
            await self._sync.publish("hint", {"model": model, "hint": hint})

    async def _watch_loop(self) -> None:
        """Publish a hint when a breaker here trips on failures (not forced, not a probe)."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            for entry in self._breakers.snapshot()["breakers"]:
                model, generation = entry["model"], entry["generation"]
                if self._generations.get(model, 0) == generation:
                    continue
                self._generations[model] = generation
                if (
                    entry["state"] == "OPEN"
                    and not entry["forced"]
                    and "consecutive failures" in str(entry["why"])
                ):
                    await self._publish_hint(model, str(entry["why"]))

    # ------------------------------------------------------------------ resync

    async def resync(self) -> None:
        """Re-read overrides and hints from Redis (what pub/sub may have lost)."""
        models = sorted(self._known_models())
        overrides_key = self._shared.key("breaker", "overrides")
        hint_keys = [self._shared.key("breaker", "hint", model) for model in models]

        async def read(redis: Any) -> tuple[dict[bytes, bytes], list[bytes | None]]:
            async with redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(overrides_key)
                pipe.mget(hint_keys)
                overrides, hints = await pipe.execute()
            return overrides, hints

        overrides, hints = await self._shared.call("breaker_resync", read, background=True)
        stored = {key.decode(): orjson.loads(value) for key, value in overrides.items()}
        for model, record in stored.items():
            self._accept(model, record)
        for model in list(self.overrides):
            if model not in stored and self.overrides[model]["replica"] != self._replica_id:
                self._forget(model)  # reset elsewhere while we were not listening
                self._apply(model, "close")
        for model, raw in zip(models, hints, strict=True):
            if raw is not None:
                self._accept_hint(model, orjson.loads(raw))
        now = self._wall()
        for model in [m for m, h in self.hints.items() if float(h["expiresAt"]) <= now]:
            del self.hints[model]

    async def _resync_loop(self) -> None:
        while True:
            with contextlib.suppress(SharedStateDown):
                await self.resync()
            await asyncio.sleep(RESYNC_INTERVAL_S)

    def view(self, model: str) -> dict[str, Any]:
        """For GET /admin/breakers: the override and the live hint for `model`."""
        now = self._wall()
        hint = self.hints.get(model)
        return {
            "override": self.overrides.get(model),
            "hint": hint if hint is not None and float(hint["expiresAt"]) > now else None,
        }
