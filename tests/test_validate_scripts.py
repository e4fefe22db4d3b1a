"""The staging validation scripts against real local servers (SPEC §9, reference §13): each
passes with its feature on, and fails — non-zero, saying which check and what it saw — with its
feature off. Every server is a child process on a loopback port."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx

from rom_agent.ops.breaker_checks import breaker_view, state_line
from rom_agent.ops.target import Samples
from tests.server import ServiceProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "validate-scripts-test-token-0123456789abcdef"  # a test value, not a secret
_CLIENT_VARS = ("BASE_URL", "ROM_AGENT_URL", "ROM_AGENT_API_KEY", "ADMIN_TOKEN")


@contextlib.contextmanager
def serve(tmp_path: Path, **env: str) -> Iterator[str]:
    """A real service with every flag the scripts look at set explicitly."""
    settings = {
        "ADMIN_TOKEN": TOKEN,
        "LOG_LEVEL": "warning",
        "ENABLE_CIRCUIT_BREAKER": "false",
        "ENABLE_BOTTLENECK": "false",
        "ENABLE_FAULT_INJECTION": "false",
        "ENABLE_METRICS": "true",
        "CIRCUIT_BREAKER_COOLDOWN_S": "2",  # the cycle waits cooldown + 1 s
        "SIMULATOR_LATENCY_MS": "0",
        **env,
    }
    service = ServiceProcess(settings, tmp_path).start()
    try:
        yield service.url
    finally:
        service.stop()


def run_script(name: str, url: str, *args: str, token: str | None = TOKEN) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k not in _CLIENT_VARS}
    env["BASE_URL"] = url
    if token is not None:
        env["ADMIN_TOKEN"] = token
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / name), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = done.stdout + done.stderr
    assert TOKEN not in output
    return done.returncode, output


def flag(url: str, key: str) -> object:
    reply = httpx.get(f"{url}/admin/flags", headers={"X-Admin-Token": TOKEN})
    return reply.json()["flags"][key]


# ---------------------------------------------------------------------- circuit breaker


def test_breaker_script_passes_with_the_breaker_on(tmp_path: Path) -> None:
    with serve(tmp_path, ENABLE_CIRCUIT_BREAKER="true") as url:
        code, out = run_script("validate-circuit-breaker.sh", url, "--enable-drills")
        assert code == 0, out
        assert "[FAIL]" not in out and "[SKIP]" not in out
        closed, opened = state_line("rom-sim-1", "CLOSED"), state_line("rom-sim-1", "OPEN")
        half_open = state_line("rom-sim-1", "HALF_OPEN")
        for line in (
            f"[PASS] B4.1 rom-sim-1 breaker CLOSED: {closed}",
            f"[PASS] B4.2 rom-sim-1 still CLOSED after 4 failures: {closed}",
            f"[PASS] B4.3 rom-sim-1 breaker OPEN: {opened}",
            f"[PASS] B4.5 rom-sim-1 breaker HALF_OPEN: {half_open}",
            "[PASS] B4.6 recovery answered 200 by rom-sim-1: 200 modelUsed=rom-sim-1",
            f"[PASS] B4.7 rom-sim-1 breaker CLOSED: {closed}",
            "[PASS] B5 model_fallback_exhausted_total grew by the forced failures: +5",
            "ENABLE_FAULT_INJECTION: true -> false (drill over)",
            "validate-circuit-breaker: PASSED",
        ):
            assert line in out
        assert "waiting 3 s: cooldown + 1 s" in out  # read from /admin/flags, not assumed
        assert flag(url, "ENABLE_FAULT_INJECTION") is False


def test_breaker_script_fails_with_the_breaker_off(tmp_path: Path) -> None:
    with serve(tmp_path) as url:
        code, out = run_script("validate-circuit-breaker.sh", url, "--enable-drills")
        assert code == 1, out
        assert "[FAIL] B3.1 ENABLE_CIRCUIT_BREAKER is true\n       observed: false" in out
        # The drill ran and the breaker never opened: the behaviour fails, not only the flag.
        assert (
            "[FAIL] B4.3 rom-sim-1 breaker OPEN\n"
            f"       observed: {state_line('rom-sim-1', 'CLOSED')}\n"
            f"       expected: {state_line('rom-sim-1', 'OPEN')}"
        ) in out
        assert "[FAIL] B4.3 circuit_breaker_failure_total{model=rom-sim-1} grew by 5" in out
        assert "[SKIP] B4.4-4.7 cooldown and recovery" in out
        assert "validate-circuit-breaker: FAILED" in out
        assert flag(url, "ENABLE_FAULT_INJECTION") is False

        # Without drills it stops before sending anything and says how to proceed.
        code, out = run_script("validate-circuit-breaker.sh", url)
        assert code == 1, out
        assert "[FAIL] B4.2 ENABLE_FAULT_INJECTION is true (FORCE_ERROR needs it)" in out
        assert "pass --enable-drills" in out


def test_breaker_script_refuses_without_a_valid_token(tmp_path: Path) -> None:
    with serve(tmp_path, ENABLE_CIRCUIT_BREAKER="true") as url:
        code, out = run_script("validate-circuit-breaker.sh", url, token=None)
        assert code == 2 and "no admin token: set ADMIN_TOKEN" in out
        code, out = run_script("validate-circuit-breaker.sh", url, token="x" * 40)
        assert code == 1 and "HTTP 401 UNAUTHORIZED" in out
        assert "x" * 40 not in out


def test_scripts_fail_when_the_service_is_unreachable() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for script in ("validate-circuit-breaker.sh", "validate-bottleneck.sh"):
        code, out = run_script(script, url)
        assert code == 1, out
        assert f"cannot reach {url}" in out and "FAILED" in out


# ---------------------------------------------------------------------- bottleneck


def test_bottleneck_script_passes_with_the_bottleneck_on(tmp_path: Path) -> None:
    # No drills: the simulator's own latency keeps the burst in flight.
    env = {"ENABLE_BOTTLENECK": "true", "MAX_CONCURRENT": "2", "MAX_QUEUE": "3"}
    with serve(tmp_path, SIMULATOR_LATENCY_MS="1000", **env) as url:
        code, out = run_script("validate-bottleneck.sh", url)
        assert code == 0, out
        assert "[FAIL]" not in out and "[SKIP]" not in out
        for line in (
            "from /admin/flags: MAX_CONCURRENT=2 MAX_QUEUE=3",
            "burst of 10 simultaneous requests",
            "answers: 200 x5, 503 QUEUE_FULL x5",
            "[PASS] C4.2 answered 200 (MAX_CONCURRENT + MAX_QUEUE): 5",
            "[PASS] C4.2 rejected at once with 503 QUEUE_FULL: 5",
            "[PASS] C4.2 the 503 body names the live limits: "
            "Service temporarily unavailable: queue full (3/3)",
            '[PASS] C4.3 bottleneck_rejected_total{operation="converse",reason="queue_full"} '
            "grew by 5: +5",
            "validate-bottleneck: PASSED",
        ):
            assert line in out
        assert flag(url, "ENABLE_FAULT_INJECTION") is False  # never touched


def test_bottleneck_script_fails_with_the_bottleneck_off(tmp_path: Path) -> None:
    with serve(tmp_path, MAX_CONCURRENT="2", MAX_QUEUE="3") as url:
        code, out = run_script("validate-bottleneck.sh", url, "--enable-drills", "--delay-ms=1000")
        assert code == 1, out
        assert "each request held 1000 ms by X-Fault: delay_ms=1000" in out
        assert "answers: 200 x10" in out
        for failed in (
            "[FAIL] C3.1 ENABLE_BOTTLENECK is true\n       observed: false",
            "[FAIL] C4.2 answered 200 (MAX_CONCURRENT + MAX_QUEUE)\n       observed: 10\n"
            "       expected: 5",
            "[FAIL] C4.2 rejected at once with 503 QUEUE_FULL\n       observed: 0\n"
            "       expected: 5",
            '[FAIL] C4.3 bottleneck_rejected_total{operation="converse",reason="queue_full"} '
            "grew by 5\n       observed: +0",
        ):
            assert failed in out
        assert "validate-bottleneck: FAILED" in out
        assert flag(url, "ENABLE_FAULT_INJECTION") is False


# ---------------------------------------------------------------------- parsing


def test_comment_lines_never_satisfy_a_check() -> None:
    # The Node script's only hard check passed on this HELP line (reference §13.1).
    text = (
        "# HELP circuit_breaker_state Circuit breaker state (0=CLOSED, 1=HALF_OPEN, 2=OPEN)\n"
        "# TYPE circuit_breaker_state gauge\n"
    )
    assert str(breaker_view(Samples(text), "rom-sim-1")) == "no circuit_breaker_state series"
    text += 'circuit_breaker_state{model="rom-sim-1",operation="converse",state="OPEN"} 2.0\n'
    assert str(breaker_view(Samples(text), "rom-sim-1")) == state_line("rom-sim-1", "OPEN")
    assert str(breaker_view(Samples(text), "rom-sim-2")) == "no circuit_breaker_state series"
