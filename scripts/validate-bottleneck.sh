#!/usr/bin/env bash
# The staging guide's stage C check: a burst of MAX_CONCURRENT + MAX_QUEUE + 5 simultaneous
# requests gets exactly MAX_CONCURRENT + MAX_QUEUE answers and exactly 5 immediate 503
# QUEUE_FULL, and bottleneck_rejected_total grows by 5; against $BASE_URL (default
# http://127.0.0.1:8000) with $ADMIN_TOKEN. Limits are read from /admin/flags; every step is
# printed; exit 0 only if every check passed (1 a check failed, 2 bad usage).
#
#   read -rs ADMIN_TOKEN && export ADMIN_TOKEN
#   BASE_URL=http://127.0.0.1:8000 scripts/validate-bottleneck.sh [--enable-drills] [--delay-ms 3000]
#
# The burst must be slow enough to fill the queue: with ENABLE_FAULT_INJECTION on (or
# --enable-drills, which switches it on for the drill only) each request is held by
# `X-Fault: delay_ms`; otherwise it relies on the provider's latency. Logic:
# src/rom_agent/ops/validate.py.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$root/.venv/bin/python"
[[ -x "$python" ]] || python="${PYTHON:-python3}"
# The checkout's code, whether or not the package is installed.
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m rom_agent.ops.validate bottleneck "$@"
