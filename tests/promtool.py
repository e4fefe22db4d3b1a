"""Prometheus's own `promtool` (Debian package `prometheus`, installed by scripts/test.sh).

On a developer machine without it the tests that need it skip with a loud reason; in CI
(`CI` set) they fail instead, so a missing install step can never pass as green.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RULES_DIR = ROOT / "deploy" / "prometheus"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        message = (
            "PROMTOOL IS MISSING: install Debian's `prometheus` package "
            "(scripts/test.sh does so with apt-get when it can)"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def run(*args: str | Path, cwd: Path = RULES_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300
    )
