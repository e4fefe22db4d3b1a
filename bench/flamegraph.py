"""py-spy flame graphs of a running gateway, taken by the benchmark while wrk loads it.

Used by `bench/harness.py` after the measured throughput and streaming rounds (so sampling never
touches a measured window): `flame-throughput.svg` and `flame-streaming.svg` under
`bench/results/`. py-spy attaches with ptrace, so it needs root (or CAP_SYS_PTRACE); without it
the run goes on and the report says no flame graph was taken.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RATE_HZ = 200  # samples/s: enough stacks in a few seconds, little cost to the sampled process


def py_spy() -> str | None:
    """The py-spy binary: the project venv's (run.sh installs it there), else one on PATH."""
    local = Path(sys.executable).parent / "py-spy"
    if local.exists():
        return str(local)
    return shutil.which("py-spy")


def record(
    pid: int,
    out: Path,
    seconds: float,
    load: Callable[[], object],
    pin: Callable[[], None] | None = None,
) -> str:
    """Sample `pid` for `seconds` while `load()` runs; write an SVG flame graph to `out`.

    Returns "ok" or why there is no graph (the benchmark keeps going either way)."""
    binary = py_spy()
    if binary is None:
        return "py-spy missing (bench/run.sh installs it into .venv)"
    out.parent.mkdir(parents=True, exist_ok=True)
    duration = max(1, round(seconds))
    sampler = subprocess.Popen(
        [
            binary,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(duration),
            "--rate",
            str(RATE_HZ),
            "--format",
            "flamegraph",
            "--nonblocking",  # never pause the gateway: its latency stays what it would be
            "-o",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=pin,
    )
    load()
    try:
        _, stderr = sampler.communicate(timeout=duration + 30)
    except subprocess.TimeoutExpired:
        sampler.kill()
        _, stderr = sampler.communicate()
    if sampler.returncode != 0 or not out.exists():
        reason = (stderr or "").strip().splitlines()
        return f"py-spy failed: {reason[-1] if reason else sampler.returncode}"
    return "ok"
