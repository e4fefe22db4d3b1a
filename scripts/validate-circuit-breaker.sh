#!/usr/bin/env bash
# The staging guide's stage B check: CLOSED -> OPEN -> HALF_OPEN -> CLOSED and the fallback
# metrics, against $BASE_URL (default http://127.0.0.1:8000) with $ADMIN_TOKEN.
# Threshold and cooldown are read from /admin/flags; every step is printed; exit 0 only if every
# check passed (1 a check failed, 2 bad usage).
#
#   read -rs ADMIN_TOKEN && export ADMIN_TOKEN
#   BASE_URL=http://127.0.0.1:8000 scripts/validate-circuit-breaker.sh [--enable-drills]
#
# The forced failures need ENABLE_FAULT_INJECTION; --enable-drills switches it on for the drill
# only and off again afterwards. Logic: src/rom_agent/ops/validate.py.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$root/.venv/bin/python"
[[ -x "$python" ]] || python="${PYTHON:-python3}"
# The checkout's code, whether or not the package is installed.
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m rom_agent.ops.validate breaker "$@"
