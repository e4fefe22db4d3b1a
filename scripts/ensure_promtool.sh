#!/usr/bin/env bash
# promtool (Debian's `prometheus` package) checks the alert rules and the dashboard's queries.
# Installed with apt-get when missing (root); if that fails the tests that need it skip on a dev
# machine and FAIL in CI (tests/promtool.py).
set -uo pipefail
command -v promtool >/dev/null && exit 0
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "scripts/test.sh: installing Debian's prometheus package for promtool" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      -o DPkg::Lock::Timeout=600 --no-install-recommends prometheus; } >/dev/null || true
fi
command -v promtool >/dev/null || {
  echo "################################################################################" >&2
  echo "## promtool NOT AVAILABLE: alert-rule and dashboard tests will SKIP (FAIL in CI)." >&2
  echo "## Install it: apt-get install prometheus" >&2
  echo "################################################################################" >&2
}
exit 0
