"""Composition details that no route shows directly."""

from __future__ import annotations

from pathlib import Path

import pytest

from rom_agent.app import env_keys


def test_sources_count_dotenv_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text("MAX_CONCURRENT=7\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ENABLE_BOTTLENECK", "true")
    monkeypatch.delenv("MAX_QUEUE", raising=False)
    keys = env_keys()
    assert "max_concurrent" in keys  # from .env
    assert "enable_bottleneck" in keys  # from the environment
    assert "max_queue" not in keys  # a default
