#!/usr/bin/env bash
# The gateway benchmark in one command: ours vs LiteLLM's proxy vs a bare pass-through.
#
#   bench/run.sh [--quick] [--gateways bare,litellm,ours] [--rounds N] [--no-curve] ...
#
# Sets up what is missing (wrk from Debian, matplotlib in the project venv, LiteLLM pinned in
# its own venv under bench/ — never a project dependency), then runs bench/harness.py, which
# starts the fake upstream and the gateways on loopback, measures in interleaved rounds, writes
# bench/results/<date>.json, regenerates docs/benchmarks.md and the plot, and stops everything.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
VENV="$ROOT/.venv"
LITELLM_VENV="$HERE/.venv-litellm"
LITELLM_PIN="litellm[proxy]==1.108.7"

say() { printf '[bench] %s\n' "$*"; }

if [[ "$(nproc)" -lt 2 ]]; then
    say "needs 2 cores (gateways on CPU 0, upstream and load on CPU 1)" >&2
    exit 1
fi

if ! command -v wrk >/dev/null 2>&1; then
    say "installing wrk (Debian package)"
    if [[ "$(id -u)" -ne 0 ]]; then
        say "wrk is missing and this is not root: apt-get install wrk first" >&2
        exit 1
    fi
    apt-get install -y -qq wrk >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq wrk; }
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating the project venv"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q -c "$ROOT/constraints.txt" -e "$ROOT"
fi
if ! "$VENV/bin/python" -c "import rom_agent, httptools, uvloop, aiohttp, orjson" 2>/dev/null; then
    say "installing the project into its venv"
    "$VENV/bin/pip" install -q -c "$ROOT/constraints.txt" -e "$ROOT"
fi
if ! "$VENV/bin/python" -c "import matplotlib" 2>/dev/null; then
    say "installing matplotlib (the project's bench extra)"
    "$VENV/bin/pip" install -q -c "$ROOT/constraints.txt" 'matplotlib>=3.8'
fi

if [[ ! -x "$VENV/bin/py-spy" ]]; then
    # The flame graphs of ours (bench/flamegraph.py); a bench tool, never a project dependency.
    say "installing py-spy into the project venv"
    "$VENV/bin/pip" install -q 'py-spy>=0.4,<0.5' ||
        say "py-spy did not install: the run goes on without flame graphs" >&2
fi

wants_litellm=1
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --gateways=*) [[ "${args[i]#*=}" == *litellm* ]] || wants_litellm=0 ;;
        --gateways) [[ "${args[i + 1]:-}" == *litellm* ]] || wants_litellm=0 ;;
    esac
done
if [[ "$wants_litellm" -eq 1 ]] && ! "$LITELLM_VENV/bin/python" -c \
    "import importlib.metadata as m, sys; sys.exit(m.version('litellm') != '1.108.7')" 2>/dev/null; then
    say "installing $LITELLM_PIN into bench/.venv-litellm (takes a minute or two)"
    rm -rf "$LITELLM_VENV"
    python3 -m venv "$LITELLM_VENV"
    "$LITELLM_VENV/bin/pip" install -q "$LITELLM_PIN"
fi

cd "$ROOT"
exec "$VENV/bin/python" "$HERE/harness.py" "$@"
