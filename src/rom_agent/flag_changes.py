"""What a runtime flag change is, apart from the store that applies it: which keys may change
at runtime (and which are shown read-only), how operator input is parsed into
environment-style strings, how values are shown, the audit entry and the `FlagPersistence`
seam where overrides and the audit log are kept. The store is `rom_agent.flags`.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from pydantic import SecretStr

from rom_agent.config import SECRET_KEYS, ConfigError, Settings

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
