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
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from pydantic import SecretStr, ValidationError

from rom_agent.config import SECRET_KEYS, ConfigError, Settings, describe_validation_error
from rom_agent.logs import get_logger

log = get_logger("rom_agent.flags")

# Parameters an operator may change at runtime. Addresses, secrets, storage and the model
# chain need a restart: changing them live would orphan connections, breakers and data.
RUNTIME_KEYS: tuple[str, ...] = (
    "enable_retry",
    "enable_circuit_breaker",
    "enable_bottleneck",
    "enable_guardrails",
    "enable_metrics",
    "enable_fault_injection",
    "circuit_breaker_threshold",
    "circuit_breaker_cooldown_s",
    "circuit_breaker_half_open_max_calls",
    "max_concurrent",
    "max_queue",
    "queue_timeout_s",
    "admission_scope",
    "max_retries",
    "retry_base_delay_ms",
    "retry_max_delay_ms",
    "retry_budget_ratio",
    "guardrail_mode",
    "guardrail_soft_limit",
    "guardrail_hard_limit",
    "guardrail_repetition_limit",
    "request_timeout_s",
    "attempt_timeout_s",
    "first_token_timeout_s",
    "stream_idle_timeout_s",
    "enable_stream_continuation",
    "enable_hedging",
    "hedge_delay_s",
    "hedge_budget_ratio",
    "history_max_messages",
    "max_agent_turns",
    "max_message_chars",
    "max_body_bytes",
)

# Shown read-only by GET /admin/flags next to the runtime keys.
STATIC_KEYS: tuple[str, ...] = (
    "host",
    "port",
    "model_chain",
    "aws_region",
    "bedrock_endpoint_url",
    "openai_base_url",
    "database_url",
    "redis_url",
    "replica_id",
    "fleet_key_prefix",
    "fleet_lease_ttl_s",
    "kb_dir",
    "cors_origins",
    "log_level",  # loggers are built once at startup (cached for speed)
    "log_format",
)

Listener = Callable[[Settings], None]

# Audit actions. Breaker actions share the log so one history shows every admin intervention.
SET, UNSET, DISCARD = "set", "unset", "discard"


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_URL_PASSWORD = re.compile(r"^([a-z][a-z0-9+.-]*://[^:/@]*):[^@/]*@", re.IGNORECASE)


def public_value(value: Any) -> Any:
    """A settings value as JSON shows it. Secrets never get here (see `SECRET_KEYS`); a
    password inside a URL (DATABASE_URL, REDIS_URL) is masked."""
    if isinstance(value, SecretStr):  # defence in depth: never render a secret
        raise TypeError("secret values are not public")
    if isinstance(value, str):
        return _URL_PASSWORD.sub(r"\1:***@", value)
    return list(value) if isinstance(value, tuple) else value


def env_string(value: Any) -> str:
    """`value` written the way an environment variable would hold it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    raise TypeError(f"no environment form for {type(value).__name__}")


def parse_changes(raw: Mapping[str, Any]) -> dict[str, str]:
    """Operator input → {field name: environment-style string}; ConfigError naming the key.

    Keys may be upper or lower case. Values may be JSON-typed (`true`, `5`) or strings
    (`"true"`, `"5"`); both become the string an environment variable would hold, so they are
    parsed by exactly the same validators as the environment (JSON `true` for an integer is
    refused, as `MAX_QUEUE=true` would be).
    """
    if not raw:
        raise ConfigError("no flags given")
    changes: dict[str, str] = {}
    for key, value in raw.items():
        name = key.strip().lower() if isinstance(key, str) else ""
        shown = name.upper() or repr(key)
        if name not in RUNTIME_KEYS:
            if shown in SECRET_KEYS or name in STATIC_KEYS or name in Settings.model_fields:
                raise ConfigError(f"{shown}: not changeable at runtime (restart with a new value)")
            raise ConfigError(f"{shown}: unknown flag")
        if name in changes:
            raise ConfigError(f"{shown}: given more than once")
        if isinstance(value, (bool, int, float, str)):
            changes[name] = env_string(value)
        else:
            raise ConfigError(f"{shown}: expected a string, number or boolean")
    return changes


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One admin intervention. `changes` is {KEY: {"old": x, "new": y}} in effective values."""

    time: str
    action: str
    changes: dict[str, dict[str, Any]]
    client: str
    target: str | None = None  # the breaker's model for breaker actions
    id: int | None = field(default=None, compare=False)  # assigned by the store

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": self.time,
            "action": self.action,
            "target": self.target,
            "changes": self.changes,
            "client": self.client,
        }


class FlagPersistence(Protocol):
    """Where overrides and the audit log live (`store.flag_overrides`, SQLite or PostgreSQL).

    Override keys are upper case (the variable names); values are environment-style strings.
    The override set has a version number, bumped by every `save`.
    """

    async def load(self) -> dict[str, str]: ...

    async def snapshot(self) -> tuple[int, dict[str, str]]:
        """The version and the overrides, read consistently."""
        ...

    async def version(self) -> int: ...

    async def save(
        self, *, put: Mapping[str, str], delete: Collection[str], entry: AuditEntry
    ) -> int:
        """Apply the override changes and append `entry`, in one transaction; the new version."""
        ...

    async def record(self, entry: AuditEntry) -> None: ...

    async def history(self, limit: int) -> list[AuditEntry]:
        """Newest first."""
        ...


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
