#!/usr/bin/env bash
# One command: set up (first run only) and run the service on the embedded default
# (simulator models + SQLite in ./data). Extra arguments go to `rom-agent serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/rom-agent serve "$@"
