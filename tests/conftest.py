from __future__ import annotations

from pathlib import Path

import pytest

from rom_agent.config import Settings
from tests.server import isolated_settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return isolated_settings(tmp_path)
