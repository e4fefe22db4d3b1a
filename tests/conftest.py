from __future__ import annotations

from pathlib import Path

import pytest

from rom_agent.config import Settings
from tests.engines import key_prefix, pg_url, redis_url  # noqa: F401  (fixtures)
from tests.server import isolated_settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return isolated_settings(tmp_path)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say LOUDLY which tests could not run for lack of PostgreSQL or Redis."""
    from tests.engines import MISSING_MARK

    skipped = [
        report
        for report in terminalreporter.stats.get("skipped", [])
        if MISSING_MARK in str(report.longrepr)
    ]
    if not skipped:
        return
    terminalreporter.section(f"{MISSING_MARK}: {len(skipped)} tests NOT RUN", sep="#", red=True)
    for report in skipped:
        terminalreporter.write_line(f"  NOT RUN: {report.nodeid}", red=True)
    terminalreporter.write_line(
        "  Provide PostgreSQL (127.0.0.1:5432) and Redis (127.0.0.1:6379), or set "
        "ROM_TEST_PG_URL / ROM_TEST_REDIS_URL. CI (CI=true) fails instead of skipping.",
        red=True,
    )
