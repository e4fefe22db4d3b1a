#!/usr/bin/env bash
# One command: set up (first run only) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh test
scripts/ensure_engines.sh
scripts/ensure_promtool.sh
scripts/ensure_chromium.sh
.venv/bin/ruff check --quiet
.venv/bin/mypy  # --strict on src/ ([tool.mypy] in pyproject.toml); must report 0 errors
exec .venv/bin/python -m pytest "$@"
