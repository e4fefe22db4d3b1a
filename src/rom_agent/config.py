"""Typed, validated configuration (SPEC §2).

One `Settings` object is built at startup from the environment and `.env`; a bad value stops
the process with a message naming the variable. The flag store (`flags.py`) layers runtime
overrides on top of it by producing new, equally validated `Settings` snapshots.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})


def _parse_bool(value: Any) -> bool:
    """Accept exactly true/false/1/0/yes/no (any case); anything else is an error."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
    raise ValueError("expected one of true/false/1/0/yes/no")


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    return value


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


StrictBool = Annotated[bool, BeforeValidator(_parse_bool)]
CsvList = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_split_csv)]

_MODEL_REF = re.compile(r"^[a-z][a-z0-9_-]*/[^\s,]+$")


def _check_chain(chain: tuple[str, ...]) -> tuple[str, ...]:
    if not chain:
        raise ValueError("needs at least one provider/model entry")
    for entry in chain:
        if not _MODEL_REF.match(entry):
            raise ValueError(f"entry {entry!r} is not of the form provider/model")
    ids = [entry.split("/", 1)[1] for entry in chain]
    if len(set(ids)) != len(ids):
        raise ValueError("model ids (without provider prefix) must be unique")
    return chain


ModelChain = Annotated[CsvList, AfterValidator(_check_chain)]
LogLevel = Annotated[
    Literal["debug", "info", "warning", "error", "critical"], BeforeValidator(_lower)
]
AdmissionScope = Annotated[Literal["replica", "fleet"], BeforeValidator(_lower)]
GuardrailMode = Annotated[Literal["off", "dry-run", "soft", "full"], BeforeValidator(_lower)]


# Durations below this are typos or attacks ("1e-300" seconds), not configurations.
MIN_DURATION_S = 0.01


class Settings(BaseSettings):
    """Every variable of SPEC §2. Field names are the variable names, lower-cased."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
        validate_default=True,
    )

    # Network and access
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    admin_token: SecretStr | None = None
    api_keys: CsvList = ()
    cors_origins: CsvList = ()

    # Feature flags
    enable_retry: StrictBool = True
    enable_circuit_breaker: StrictBool = False
    enable_bottleneck: StrictBool = False
    enable_guardrails: StrictBool = False
    enable_metrics: StrictBool = True
    enable_fault_injection: StrictBool = False

    # Circuit breaker
    circuit_breaker_threshold: int = Field(5, ge=1, le=1000)
    circuit_breaker_cooldown_s: float = Field(30.0, ge=MIN_DURATION_S, le=3600)
    circuit_breaker_half_open_max_calls: int = Field(1, ge=1, le=100)

    # Bottleneck
    max_concurrent: int = Field(5, ge=1, le=100_000)
    max_queue: int = Field(20, ge=0, le=1_000_000)
    queue_timeout_s: float = Field(30.0, ge=MIN_DURATION_S, le=3600)

    # Retry
    max_retries: int = Field(3, ge=0, le=10)
    retry_base_delay_ms: int = Field(500, ge=0, le=60_000)
    retry_max_delay_ms: int = Field(8000, ge=0, le=600_000)
    retry_budget_ratio: float = Field(0.2, ge=0, le=1)

    # Guardrails
    guardrail_mode: GuardrailMode = "off"
    guardrail_soft_limit: int = Field(12, ge=1, le=10_000)
    guardrail_hard_limit: int = Field(25, ge=1, le=10_000)
    guardrail_repetition_limit: int = Field(3, ge=2, le=10_000)

    # Timeouts
    request_timeout_s: float = Field(120.0, ge=MIN_DURATION_S, le=3600)
    attempt_timeout_s: float = Field(60.0, ge=MIN_DURATION_S, le=3600)
    first_token_timeout_s: float = Field(20.0, ge=MIN_DURATION_S, le=3600)
    stream_idle_timeout_s: float = Field(10.0, ge=MIN_DURATION_S, le=3600)  # issue 16: was 30
    # How long a SIGTERM waits for running chat requests before closing (docs/operations.md).
    drain_timeout_s: float = Field(120.0, ge=MIN_DURATION_S, le=3600)
    # Connection limits (http/protocol.py): a slow or oversized request is refused and closed.
    max_header_bytes: int = Field(32_768, ge=1024, le=1_048_576)
    header_timeout_s: float = Field(10.0, ge=MIN_DURATION_S, le=600)
    body_timeout_s: float = Field(30.0, ge=MIN_DURATION_S, le=3600)
    keepalive_timeout_s: float = Field(5.0, ge=MIN_DURATION_S, le=600)

    # Stream failover (issue 16; choices in docs/decisions.md "Stream failover")
    enable_stream_continuation: StrictBool = True
    prefill_models: CsvList = ("bedrock/anthropic.*", "bedrock/*.anthropic.*")
    enable_hedging: StrictBool = True
    hedge_delay_s: float = Field(0.0, ge=0, le=3600)  # 0: learnt from the model's TTFT p95
    hedge_budget_ratio: float = Field(0.1, ge=0, le=1)

    # Models and providers
    model_chain: ModelChain = ("simulator/rom-sim-1", "simulator/rom-sim-2")
    aws_region: str = "us-west-2"
    bedrock_endpoint_url: str | None = None
    openai_base_url: str | None = None
    openai_api_key: SecretStr | None = None
    simulator_latency_ms: int = Field(0, ge=0, le=600_000)
    simulator_chunk_delay_ms: int = Field(0, ge=0, le=60_000)  # between streamed chunks
    # A prompt refused for content policy is the caller's answer (SPEC §4): on, the next
    # model of the chain is tried instead. Off by default.
    content_policy_fallback: StrictBool = False

    # Storage and agent
    database_url: str = "sqlite:///./data/rom-agent.db"
    # Fleet mode (issue 15): Redis for what replicas share; optional, never needed to start.
    redis_url: str | None = None
    replica_id: str = ""  # "" = host name + process id
    fleet_key_prefix: str = Field("rom-agent:", min_length=1, max_length=100)
    fleet_lease_ttl_s: float = Field(10.0, ge=1, le=600)
    # Where MAX_CONCURRENT / MAX_QUEUE apply: this process, or the whole fleet (needs Redis).
    admission_scope: AdmissionScope = "replica"
    history_max_messages: int = Field(30, ge=1, le=10_000)
    max_agent_turns: int = Field(10, ge=1, le=100)
    kb_dir: str = "./kb"
    max_message_chars: int = Field(100_000, ge=1, le=10_000_000)
    max_body_bytes: int = Field(1_048_576, ge=1024, le=100 * 1_048_576)

    # Logging
    log_level: LogLevel = "info"
    log_format: Literal["json", "console"] = "json"

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        if not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("expected sqlite:///<path> or postgresql://user@host:port/database")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value:
            return None  # REDIS_URL= (empty) means "no Redis"
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("expected redis://host:port/db, rediss://… or unix://…")
        return value

    @field_validator("admission_scope")
    @classmethod
    def _fleet_needs_redis(cls, value: str, info: Any) -> str:
        if value == "fleet" and not info.data.get("redis_url"):
            raise ValueError("fleet needs REDIS_URL (the fleet-wide budget lives in Redis)")
        return value

    @field_validator("retry_max_delay_ms")
    @classmethod
    def _cap_not_below_base(cls, value: int, info: Any) -> int:
        base = info.data.get("retry_base_delay_ms")
        if base is not None and value < base:
            raise ValueError("must be >= RETRY_BASE_DELAY_MS")
        return value

    @field_validator("guardrail_hard_limit")
    @classmethod
    def _hard_not_below_soft(cls, value: int, info: Any) -> int:
        soft = info.data.get("guardrail_soft_limit")
        if soft is not None and value < soft:
            raise ValueError("must be >= GUARDRAIL_SOFT_LIMIT")
        return value

    # Derived views, cheap and read on the hot path.
    @property
    def effective_guardrail_mode(self) -> str:
        return self.guardrail_mode if self.enable_guardrails else "off"

    @property
    def database_path(self) -> str:
        """The SQLite file ("" with PostgreSQL)."""
        if not self.database_url.startswith("sqlite:///"):
            return ""
        return self.database_url.removeprefix("sqlite:///")


class ConfigError(Exception):
    """A configuration value is invalid; the message names every offending variable."""


def describe_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        name = str(item["loc"][0]).upper() if item["loc"] else "configuration"
        raw = item.get("input")
        shown = "" if isinstance(raw, dict) or name in SECRET_KEYS else f" (got {raw!r})"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{name}: {message}{shown}")
    return "invalid configuration: " + "; ".join(lines)


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment, `.env` and `overrides`; raise ConfigError if bad."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None


SECRET_KEYS = frozenset({"ADMIN_TOKEN", "API_KEYS", "OPENAI_API_KEY"})
