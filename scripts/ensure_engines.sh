#!/usr/bin/env bash
# Makes sure PostgreSQL (127.0.0.1:5432) and Redis (127.0.0.1:6379) answer before the tests run:
# starts an installed-but-stopped engine with the machine's own start command. The PostgreSQL
# and Redis tests need them; under CI=true a missing engine fails the run, on a dev machine the
# tests that need it are skipped and listed LOUDLY at the end of the pytest run.
# Override the addresses with ROM_TEST_PG_URL / ROM_TEST_REDIS_URL.
set -uo pipefail
missing=()

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
redis_up() { [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = "PONG" ]; }

if [ -z "${ROM_TEST_PG_URL:-}" ] && ! pg_up; then
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    echo "scripts/test.sh: starting PostgreSQL" >&2
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
    for _ in $(seq 50); do pg_up && break; sleep 0.2; done
  fi
  pg_up || missing+=("PostgreSQL on 127.0.0.1:5432 (apt-get install postgresql, or set ROM_TEST_PG_URL)")
fi
if [ -z "${ROM_TEST_REDIS_URL:-}" ] && ! redis_up; then
  if command -v redis-server >/dev/null; then
    echo "scripts/test.sh: starting Redis" >&2
    mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
    for _ in $(seq 50); do redis_up && break; sleep 0.2; done
  fi
  redis_up || missing+=("Redis on 127.0.0.1:6379 (apt-get install redis-server, or set ROM_TEST_REDIS_URL)")
fi

if [ ${#missing[@]} -gt 0 ]; then
  {
    echo "################################################################################"
    for engine in "${missing[@]}"; do echo "## ENGINE MISSING: $engine"; done
    if [ "${CI:-}" = "true" ]; then
      echo "## CI requires both engines: FAILING the run."
    else
      echo "## The PostgreSQL/Redis/fleet tests that need it will be SKIPPED (listed at the end)."
    fi
    echo "################################################################################"
  } >&2
  [ "${CI:-}" = "true" ] && exit 1
fi
exit 0
