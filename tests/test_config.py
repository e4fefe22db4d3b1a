from __future__ import annotations

import pytest

from rom_agent.config import ConfigError, load_settings


def load(**values: object):
    return load_settings(_env_file=None, **values)


def test_defaults_match_the_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load()
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.enable_retry is True
    assert settings.enable_circuit_breaker is False
    assert settings.enable_bottleneck is False
    assert settings.enable_metrics is True
    assert settings.enable_fault_injection is False
    assert settings.circuit_breaker_threshold == 5
    assert settings.circuit_breaker_cooldown_s == 30
    assert (settings.max_concurrent, settings.max_queue, settings.queue_timeout_s) == (5, 20, 30)
    assert (settings.retry_base_delay_ms, settings.retry_max_delay_ms) == (500, 8000)
    assert settings.model_chain == ("simulator/rom-sim-1", "simulator/rom-sim-2")
    assert settings.database_url == "sqlite:///./data/rom-agent.db"
    assert settings.admin_token is None
    assert settings.effective_guardrail_mode == "off"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        ("Yes", True),
        ("false", False),
        ("0", False),
        ("no", False),
        ("NO", False),
    ],
)
def test_booleans_accept_exactly_the_spec_words(
    monkeypatch: pytest.MonkeyPatch, raw: str, expected: bool
) -> None:
    monkeypatch.setenv("ENABLE_BOTTLENECK", raw)
    assert load().enable_bottleneck is expected


@pytest.mark.parametrize("raw", ["on", "off", "y", "enabled", "", "2", "truee"])
def test_other_boolean_words_are_startup_errors(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("ENABLE_CIRCUIT_BREAKER", raw)
    with pytest.raises(ConfigError, match="ENABLE_CIRCUIT_BREAKER: expected one of"):
        load()


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("MAX_CONCURRENT", "0"),
        ("MAX_CONCURRENT", "five"),
        ("MAX_QUEUE", "-1"),
        ("PORT", "70000"),
        ("CIRCUIT_BREAKER_THRESHOLD", "0"),
        ("RETRY_BUDGET_RATIO", "1.5"),
        ("REQUEST_TIMEOUT_S", "0"),
        ("MAX_RETRIES", "3.5"),
        ("GUARDRAIL_MODE", "strict"),
        ("LOG_LEVEL", "loud"),
        ("LOG_FORMAT", "xml"),
        ("MODEL_CHAIN", "no-provider-prefix"),
        ("MODEL_CHAIN", ""),
        ("MODEL_CHAIN", "simulator/a,openai/a"),
        ("DATABASE_URL", "mysql://db/x"),
    ],
)
def test_bad_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, name: str, raw: str) -> None:
    monkeypatch.setenv(name, raw)
    with pytest.raises(ConfigError) as error:
        load()
    assert f"{name}:" in str(error.value)


def test_cross_field_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARDRAIL_SOFT_LIMIT", "30")
    with pytest.raises(ConfigError, match="GUARDRAIL_HARD_LIMIT: must be >= GUARDRAIL_SOFT_LIMIT"):
        load()
    monkeypatch.delenv("GUARDRAIL_SOFT_LIMIT")
    monkeypatch.setenv("RETRY_BASE_DELAY_MS", "9000")
    with pytest.raises(ConfigError, match="RETRY_MAX_DELAY_MS"):
        load()


def test_every_error_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_QUEUE", "x")
    monkeypatch.setenv("ENABLE_RETRY", "maybe")
    with pytest.raises(ConfigError) as error:
        load()
    assert "MAX_QUEUE" in str(error.value) and "ENABLE_RETRY" in str(error.value)


def test_secrets_are_never_echoed_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_KEYS", "k1,k2")
    monkeypatch.setenv("ADMIN_TOKEN", "not-shown-anywhere")
    monkeypatch.setenv("PORT", "bad")
    with pytest.raises(ConfigError) as error:
        load()
    assert "not-shown-anywhere" not in str(error.value)
    assert "not-shown-anywhere" not in repr(load_settings(_env_file=None, port=1))


def test_dotenv_is_read(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("MAX_CONCURRENT=7\nENABLE_BOTTLENECK=yes\n")
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.max_concurrent == 7
    assert settings.enable_bottleneck is True


def test_environment_wins_over_dotenv(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("MAX_CONCURRENT=7\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MAX_CONCURRENT", "9")
    assert load_settings().max_concurrent == 9


def test_lists_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("MODEL_CHAIN", "openai/gpt-4o-mini,simulator/rom-sim-1")
    settings = load()
    assert settings.cors_origins == ("https://a.example", "https://b.example")
    assert settings.model_chain == ("openai/gpt-4o-mini", "simulator/rom-sim-1")
