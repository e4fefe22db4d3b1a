"""The flag store: defaults < environment < runtime overrides, read at call time.

Every layer holds the store and reads `store.current.<field>` when it needs a value, so a change
applies to the next call everywhere. `current` is an immutable `Settings` snapshot swapped
atomically on change, so a hot-path read is one attribute access.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from rom_agent.config import ConfigError, Settings, describe_validation_error

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
    "history_max_messages",
    "max_agent_turns",
    "max_message_chars",
    "max_body_bytes",
    "log_level",
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
    "kb_dir",
    "cors_origins",
    "log_format",
)

Listener = Callable[[Settings], None]


class FlagStore:
    """Holds the current settings snapshot and the runtime overrides on top of the base."""

    def __init__(self, base: Settings, *, env_keys: frozenset[str] = frozenset()) -> None:
        self._base = base
        self._env_keys = env_keys
        self._overrides: dict[str, Any] = {}
        self._listeners: list[Listener] = []
        self.current: Settings = base

    @property
    def overrides(self) -> Mapping[str, Any]:
        return dict(self._overrides)

    def source(self, key: str) -> str:
        if key in self._overrides:
            return "runtime"
        return "env" if key in self._env_keys else "default"

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def validate(self, changes: Mapping[str, Any]) -> Settings:
        """The settings that `changes` (lower-case keys) would produce; ConfigError if invalid."""
        unknown = [key.upper() for key in changes if key not in RUNTIME_KEYS]
        if unknown:
            raise ConfigError(f"not changeable at runtime: {', '.join(sorted(unknown))}")
        merged = {**self._base.model_dump(), **self._overrides, **changes}
        try:
            # Re-validate the whole snapshot so cross-field rules (hard >= soft) hold too.
            return Settings.model_validate(merged, context={"runtime": True})
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc)) from None

    def replace_overrides(self, overrides: Mapping[str, Any]) -> Settings:
        """Install a whole override set (validated), e.g. the persisted one at startup."""
        self._overrides = {}
        settings = self.validate(overrides)
        self._overrides = {key: getattr(settings, key) for key in overrides}
        return self._install(settings)

    def set(self, changes: Mapping[str, Any]) -> Settings:
        settings = self.validate(changes)
        for key in changes:
            self._overrides[key] = getattr(settings, key)
        return self._install(settings)

    def unset(self, key: str) -> Settings:
        if key not in self._overrides:
            return self.current
        remaining = {k: v for k, v in self._overrides.items() if k != key}
        self._overrides = {}
        settings = self.validate(remaining)
        self._overrides = remaining
        return self._install(settings)

    def _install(self, settings: Settings) -> Settings:
        self.current = settings
        for listener in self._listeners:
            listener(settings)
        return settings
