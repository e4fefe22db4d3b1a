"""The flag store: defaults < environment < runtime overrides, read at call time.

Every layer holds the store and reads `store.current.<field>` when it needs a value, so a change
applies to the next call everywhere. `current` is an immutable `Settings` snapshot swapped
atomically on change, so a hot-path read is one attribute access.

Operator changes go through `update()` / `remove()`: validated by the same rules as the
environment, written to the attached `FlagPersistence` together with an audit entry (one
transaction), then installed. `load_persisted_overrides()` restores them at startup.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Mapping
from typing import Any

from pydantic import ValidationError

from rom_agent.config import SECRET_KEYS, ConfigError, Settings, describe_validation_error
from rom_agent.flag_changes import (
    DISCARD,
    RUNTIME_KEYS,
    SET,
    STATIC_KEYS,
    UNSET,
    AuditEntry,
    FlagPersistence,
    env_string,
    parse_changes,
    public_value,
    utc_now_iso,
)
from rom_agent.logs import get_logger

log = get_logger("rom_agent.flags")

Listener = Callable[[Settings], None]


class FlagStore:
    """Holds the current settings snapshot and the runtime overrides on top of the base."""

    def __init__(
        self,
        base: Settings,
        *,
        env_keys: frozenset[str] = frozenset(),
        now: Callable[[], str] = utc_now_iso,
    ) -> None:
        self._base = base
        self._env_keys = env_keys
        self._now = now
        self._overrides: dict[str, Any] = {}
        self._listeners: list[Listener] = []
        self._persistence: FlagPersistence | None = None
        self._committed: list[Callable[[int], None]] = []
        # Version of the persisted override set this snapshot reflects (0: none yet).
        self.version = 0
        # Serialises operator changes: each validates against the state the previous one left,
        # so two concurrent changes can never combine into an invalid snapshot.
        self._lock = asyncio.Lock()
        self.updated_at: str = now()
        self.current: Settings = base

    @property
    def overrides(self) -> Mapping[str, Any]:
        return dict(self._overrides)

    @property
    def persistence(self) -> FlagPersistence | None:
        return self._persistence

    def attach(self, persistence: FlagPersistence) -> None:
        self._persistence = persistence

    def source(self, key: str) -> str:
        if key in self._overrides:
            return "runtime"
        return "env" if key in self._env_keys else "default"

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def on_committed(self, listener: Callable[[int], None]) -> None:
        """Called with the new version after this process committed a change (fleet mode
        publishes it to the other replicas)."""
        self._committed.append(listener)

    async def refresh(self) -> bool:
        """Install the persisted overrides if their version is newer than ours (another
        replica changed them). True if something was installed.

        Overrides that do not validate here (a replica running a newer release with a wider
        range) are skipped with a warning and left in storage for their owner.
        """
        persistence = self._require_persistence()
        if await persistence.version() <= self.version:
            return False
        async with self._lock:
            version, stored = await persistence.snapshot()
            if version <= self.version:
                return False
            accepted, rejected = _accept_fixpoint(self, stored)
            for key, reason in rejected.items():
                log.warning("replicated flag override skipped", key=key, reason=reason)
            before = self.current
            self.replace_overrides(accepted)
            self.version = version
            changed = {
                key.upper(): public_value(getattr(self.current, key))
                for key in RUNTIME_KEYS
                if getattr(self.current, key) != getattr(before, key)
            }
            log.info("runtime flags replicated", version=version, changes=changed)
            return True

    # ------------------------------------------------------------------ in memory

    def validate(self, changes: Mapping[str, Any]) -> Settings:
        """The settings that `changes` (lower-case keys) would produce; ConfigError if invalid."""
        unknown = [key.upper() for key in changes if key not in RUNTIME_KEYS]
        if unknown:
            raise ConfigError(f"not changeable at runtime: {', '.join(sorted(unknown))}")
        return self._settings_with({**self._overrides, **changes})

    def replace_overrides(self, overrides: Mapping[str, Any]) -> Settings:
        """Install a whole override set (validated), e.g. the persisted one at startup."""
        self._overrides = {}
        settings = self.validate(overrides)
        self._overrides = {key: getattr(settings, key) for key in overrides}
        return self._install(settings)

    def set(self, changes: Mapping[str, Any]) -> Settings:
        """Change overrides in memory only (tests, internal use); operators use `update()`."""
        settings = self.validate(changes)
        for key in changes:
            self._overrides[key] = getattr(settings, key)
        return self._install(settings)

    def unset(self, key: str) -> Settings:
        if key not in self._overrides:
            return self.current
        remaining = {k: v for k, v in self._overrides.items() if k != key}
        settings = self._settings_with(remaining)
        self._overrides = remaining
        return self._install(settings)

    # ------------------------------------------------------------------ persisted, audited

    async def update(self, raw: Mapping[str, Any], *, client: str) -> AuditEntry:
        """Validate operator input as a whole, persist it with its audit entry, apply it.

        ConfigError (naming the key) if anything is invalid; then nothing is applied.
        """
        changes = parse_changes(raw)
        # Shielded: once the commit is under way it also reaches memory, even if the request
        # is cancelled meanwhile — storage and the running process never disagree.
        entry = await asyncio.shield(self._commit(changes, (), SET, client))
        assert entry is not None  # only a removal can find nothing to do
        return entry

    async def remove(self, key: str, *, client: str) -> AuditEntry | None:
        """Drop the runtime override of `key` (any case); None if there is none."""
        return await asyncio.shield(self._commit({}, (key.strip().lower(),), UNSET, client))

    async def record(
        self,
        action: str,
        changes: dict[str, dict[str, Any]],
        *,
        client: str,
        target: str | None = None,
    ) -> AuditEntry:
        """Append a non-flag admin action (a manual breaker change) to the audit log."""
        entry = AuditEntry(self._now(), action, changes, client, target)
        await self._require_persistence().record(entry)
        return entry

    async def history(self, limit: int) -> list[AuditEntry]:
        return await self._require_persistence().history(limit)

    async def _commit(
        self, put: Mapping[str, str], delete: Collection[str], action: str, client: str
    ) -> AuditEntry | None:
        persistence = self._require_persistence()
        async with self._lock:
            if any(key not in self._overrides for key in delete):
                return None
            overrides = {k: v for k, v in self._overrides.items() if k not in delete}
            overrides.update(put)
            settings = self._settings_with(overrides)
            before = self.current
            entry = AuditEntry(
                time=self._now(),
                action=action,
                changes={
                    key.upper(): {
                        "old": public_value(getattr(before, key)),
                        "new": public_value(getattr(settings, key)),
                    }
                    for key in (*put, *delete)
                },
                client=client,
            )
            version = await persistence.save(
                put={key.upper(): env_string(getattr(settings, key)) for key in put},
                delete=[key.upper() for key in delete],
                entry=entry,
            )
            self._overrides = {key: getattr(settings, key) for key in overrides}
            self._install(settings)
            self.version = version
            for listener in self._committed:
                try:
                    listener(version)
                except Exception:  # publishing is best effort; the poll catches up
                    log.exception("flag commit listener failed")
            log.info("runtime flags changed", action=action, changes=entry.changes, client=client)
            return entry

    # ------------------------------------------------------------------ internals

    def _require_persistence(self) -> FlagPersistence:
        if self._persistence is None:
            raise RuntimeError("no flag persistence attached (see load_persisted_overrides)")
        return self._persistence

    def _settings_with(self, overrides: Mapping[str, Any]) -> Settings:
        merged = {**self._base.model_dump(), **overrides}
        try:
            # Re-validate the whole snapshot so cross-field rules (hard >= soft) hold too.
            return Settings.model_validate(merged, context={"runtime": True})
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc)) from None

    def _install(self, settings: Settings) -> Settings:
        self.current = settings
        self.updated_at = self._now()
        for listener in self._listeners:
            try:
                listener(settings)
            except Exception:  # one broken listener must not keep the change from the others
                log.exception(
                    "flag listener failed", listener=getattr(listener, "__qualname__", "")
                )
        return settings


async def load_persisted_overrides(flags: FlagStore, persistence: FlagPersistence) -> list[str]:
    """Attach `persistence` to `flags` and install the overrides stored there (call at startup).

    An override that no longer validates (range tightened, key no longer runtime-changeable, a
    new environment value breaking a cross-field rule) is skipped with a warning, dropped from
    storage and audited as `discard` — a stale row must never stop the service from starting.
    Returns the skipped keys.
    """
    flags.attach(persistence)
    version, stored = await persistence.snapshot()
    accepted, reasons = _accept_fixpoint(flags, stored)
    pending = {key: stored[key] for key in reasons}
    flags.replace_overrides(accepted)
    flags.version = version
    if accepted:
        log.info("runtime flag overrides restored", keys=sorted(k.upper() for k in accepted))
    if pending:
        await _discard(flags, persistence, pending, reasons)
    return sorted(pending)


def _accept_fixpoint(
    flags: FlagStore, stored: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The stored overrides that validate (field name → env string) and, per rejected key,
    why. Fixpoint: a key rejected alone may pass once its partner is in (soft limit 30 needs
    the stored hard limit 40 first), so the rejected ones are retried until a round adds
    nothing."""
    accepted: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    pending = dict(stored)
    progress = True
    while pending and progress:
        progress = False
        for key, value in list(pending.items()):
            try:
                change = parse_changes({key: value})
                flags._settings_with({**accepted, **change})
            except ConfigError as exc:
                reasons[key] = str(exc)
                continue
            accepted.update(change)
            del pending[key]
            reasons.pop(key, None)
            progress = True
    return accepted, reasons


async def _discard(
    flags: FlagStore,
    persistence: FlagPersistence,
    stale: Mapping[str, str],
    reasons: Mapping[str, str],
) -> None:
    current = flags.current
    changes: dict[str, dict[str, Any]] = {}
    for key, value in stale.items():
        log.warning("persisted flag override skipped", key=key, reason=reasons[key])
        name = key.lower()
        # Only a hand-edited database could hold a secret here; still, never echo one.
        old = "<redacted>" if key.upper() in SECRET_KEYS else value
        new = public_value(getattr(current, name)) if name in RUNTIME_KEYS + STATIC_KEYS else None
        changes[key] = {"old": old, "new": new}
    entry = AuditEntry(time=flags._now(), action=DISCARD, changes=changes, client="startup")
    await persistence.save(put={}, delete=list(stale), entry=entry)
