#!/usr/bin/env bash
# The browser tests (tests/browser) drive Debian's Chromium; Playwright never downloads one.
# Installs it when missing (apt-get, as root). Never fails the run itself: when it cannot
# install, it says so loudly, and the browser tests then fail under CI / skip loudly elsewhere.
set -uo pipefail
CHROMIUM=${CHROMIUM_PATH:-/usr/bin/chromium}
[ -x "$CHROMIUM" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "scripts/ensure_chromium.sh: installing Debian's chromium for the browser tests…" >&2
  if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/tmp/rom-agent-chromium-install.log 2>&1; then
    exit 0
  fi
  tail -5 /tmp/rom-agent-chromium-install.log >&2
fi
cat >&2 <<MSG
################################################################################
#  CHROMIUM IS MISSING ($CHROMIUM) AND COULD NOT BE INSTALLED.                  #
#  The browser tests in tests/browser will NOT run (they fail when CI is set).  #
#  Install it with:   sudo apt-get install -y chromium                          #
################################################################################
MSG
exit 0
