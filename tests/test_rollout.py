"""`rom-agent rollout` against real local servers (SPEC §9): stages A → B → C with validation,
automatic rollback of a failed stage, fault injection always off at the end, and the report."""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rom_agent.cli import build_parser, main
from rom_agent.ops.client import AdminClient
from rom_agent.ops.rollout import run_rollout
from rom_agent.ops.rollout_model import Context, Plan
from rom_agent.ops.rollout_report import render_report
from rom_agent.ops.target import Target
from tests.server import ServiceProcess, free_port

TOKEN = "rollout-test-admin-token-0123456789abcdef"  # a test value, not a secret
_ROW = re.compile(r"^\| [^|]+ \| .+ \| (PASS|FAIL|SKIP) \| ", re.M)


@contextlib.contextmanager
def serve(tmp_path: Path, **env: str) -> Iterator[str]:
    """A real service starting from the guide's "before" state (6/10, every feature off)."""
    settings = {
        "ADMIN_TOKEN": TOKEN,
        "LOG_LEVEL": "warning",
        "ENABLE_CIRCUIT_BREAKER": "false",
        "ENABLE_BOTTLENECK": "false",
        "ENABLE_FAULT_INJECTION": "false",
        "ENABLE_METRICS": "true",
        "MAX_CONCURRENT": "6",
        "MAX_QUEUE": "10",
        "CIRCUIT_BREAKER_COOLDOWN_S": "2",
        "SIMULATOR_LATENCY_MS": "0",
        **env,
    }
    service = ServiceProcess(settings, tmp_path).start()
    try:
        yield service.url
    finally:
        service.stop()


@pytest.fixture(autouse=True)
def _client_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BASE_URL", "ROM_AGENT_URL", "ROM_AGENT_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ADMIN_TOKEN", TOKEN)


def rollout(url: str, report: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """The command as an operator runs it, on small limits and short holds to stay fast."""
    code = main(
        [
            "rollout",
            "--url",
            url,
            "--max-concurrent",
            "2",
            "--max-queue",
            "3",
            "--burst-delay-ms",
            "2000",
            "--report",
            str(report),
        ]
    )
    out = capsys.readouterr()
    text = report.read_text()
    assert TOKEN not in out.out + out.err + text
    return code, out.out, text


def flags(url: str) -> dict[str, object]:
    reply = httpx.get(f"{url}/admin/flags", headers={"X-Admin-Token": TOKEN})
    result: dict[str, object] = reply.json()["flags"]
    return result


def results(report: str) -> list[str]:
    return _ROW.findall(report)


def test_happy_path_goes_through_a_b_c_and_reports_go(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with serve(tmp_path) as url:
        code, out, report = rollout(url, tmp_path / "report.md", capsys)
        assert code == 0, out
        assert report.startswith("# Staging validation report\n\n**Verdict: GO**")
        outcomes = results(report)
        assert len(outcomes) >= 50 and set(outcomes) == {"PASS"}
        for row in (
            "| A. Align the bottleneck parameters | ✅ passed | 4/4 |",
            "| B. Circuit breaker | ✅ passed |",
            "| C. Bottleneck | ✅ passed |",
            "MAX_CONCURRENT: 6 -> 2 (stage A)",
            "ENABLE_CIRCUIT_BREAKER: false -> true (stage B)",
            '`circuit_breaker_state{model="rom-sim-1",operation="converse",state="OPEN"} 2.0`',
            '`circuit_breaker_state{model="rom-sim-1",operation="converse",state="HALF_OPEN"} 1.0`',
            "| C4.2 | rejected at once with 503 QUEUE_FULL | PASS | `5` | `5` |",
            "| ENABLE_FAULT_INJECTION | `false` | runtime |",
            "| ENABLE_BOTTLENECK | `true` | runtime |",
        ):
            assert row in report
        assert "waiting 3 s: cooldown + 1 s" in out and "10/10 answered" in out  # progress
        final = flags(url)
        assert final["ENABLE_CIRCUIT_BREAKER"] is True and final["ENABLE_BOTTLENECK"] is True
        assert final["ENABLE_FAULT_INJECTION"] is False
        assert (final["MAX_CONCURRENT"], final["MAX_QUEUE"]) == (2, 3)
        assert out.count("ENABLE_FAULT_INJECTION: false -> true (drill)") == 2
        assert out.count("ENABLE_FAULT_INJECTION: true -> false (drill over)") == 2


def test_a_failed_stage_c_is_rolled_back_and_the_verdict_is_no_go(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A queue timeout shorter than the hold: the queued requests time out instead of being
    # answered, which the burst check must catch.
    with serve(tmp_path, QUEUE_TIMEOUT_S="1") as url:
        code, out, report = rollout(url, tmp_path / "report.md", capsys)
        assert code == 1, out
        assert "**Verdict: NO-GO** — stage C failed (C4.2 answered 200" in report
        assert "ENABLE_BOTTLENECK rolled back" in report
        assert "| C4.2 | answered 200 (MAX_CONCURRENT + MAX_QUEUE) | FAIL | `2` | `5` |" in report
        assert "answers: 200 x2, 503 QUEUE_FULL x5, 503 QUEUE_TIMEOUT x3" in out
        assert "| B. Circuit breaker | ✅ passed |" in report
        assert "ENABLE_BOTTLENECK: true -> false (rollback)" in report
        assert "| R | ENABLE_BOTTLENECK back to false | PASS | `false` | `false` |" in report
        final = flags(url)
        assert final["ENABLE_BOTTLENECK"] is False  # rolled back
        assert final["ENABLE_CIRCUIT_BREAKER"] is True  # stage B was validated: it stays
        assert final["ENABLE_FAULT_INJECTION"] is False


def test_a_failed_stage_b_is_rolled_back_and_stage_c_never_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Every real provider call outlives its attempt timeout: the forced failures still open
    # the breaker, but the recovery probe fails, so the breaker cannot close again.
    env = {"SIMULATOR_LATENCY_MS": "3000", "ATTEMPT_TIMEOUT_S": "0.5"}
    with serve(tmp_path, **env) as url:
        code, out, report = rollout(url, tmp_path / "report.md", capsys)
        assert code == 1, out
        assert "**Verdict: NO-GO** — stage B failed (B4.6 recovery answered 200" in report
        assert "| B4.7 | rom-sim-1 breaker CLOSED | FAIL |" in report
        assert "| C. Bottleneck | ⏸️ not run |" in report
        assert "ENABLE_CIRCUIT_BREAKER: true -> false (rollback)" in report
        final = flags(url)
        assert final["ENABLE_CIRCUIT_BREAKER"] is False  # rolled back
        assert final["ENABLE_BOTTLENECK"] is False  # never touched
        assert (final["MAX_CONCURRENT"], final["MAX_QUEUE"]) == (2, 3)  # stage A stays
        assert final["ENABLE_FAULT_INJECTION"] is False


def test_stage_a_fails_when_a_feature_is_already_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with serve(tmp_path, ENABLE_BOTTLENECK="true", ENABLE_FAULT_INJECTION="true") as url:
        code, out, report = rollout(url, tmp_path / "report.md", capsys)
        assert code == 1, out
        assert "**Verdict: NO-GO** — stage A failed (A4 ENABLE_BOTTLENECK still false)" in report
        assert "MAX_CONCURRENT: 2 -> 6 (rollback)" in report
        final = flags(url)
        assert (final["MAX_CONCURRENT"], final["MAX_QUEUE"]) == (6, 10)
        assert final["ENABLE_CIRCUIT_BREAKER"] is False
        # No drill ran, yet the rollout does not leave fault injection on.
        assert "ENABLE_FAULT_INJECTION: true -> false (rollout over)" in out
        assert final["ENABLE_FAULT_INJECTION"] is False


def test_ctrl_c_during_the_cooldown_rolls_back_and_switches_drills_off(tmp_path: Path) -> None:
    def interrupt(_seconds: float) -> None:
        raise KeyboardInterrupt

    with serve(tmp_path) as url:
        out = io.StringIO()
        target = Target(AdminClient(url, TOKEN))
        result = run_rollout(Context(target, Plan(2, 3, 1000), out, sleep=interrupt))
        assert result.interrupted and not result.go
        assert [run.status for run in result.runs] == ["passed", "failed", "not run"]
        report = render_report(result)
        assert (
            "**Verdict: NO-GO** — stage B was interrupted; ENABLE_CIRCUIT_BREAKER rolled back"
        ) in report
        final = flags(url)
        assert final["ENABLE_CIRCUIT_BREAKER"] is False
        assert final["ENABLE_FAULT_INJECTION"] is False


def test_an_unreachable_service_is_no_go_without_any_change(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code, _, report = rollout(url, tmp_path / "report.md", capsys)
    assert code == 1
    assert "**Verdict: NO-GO** — the preflight failed; no flag was changed." in report
    assert f"cannot reach {url}" in report


def test_a_chat_route_refusing_our_key_is_no_go_before_any_change(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with serve(tmp_path, API_KEYS="rollout-chat-key") as url:
        code, out, report = rollout(url, tmp_path / "report.md", capsys)
        assert code == 1, out
        assert "**Verdict: NO-GO** — the preflight failed; no flag was changed." in report
        assert (
            "| P | chat route reachable with our API key (POST /api/chat) | FAIL | "
            "`401 UNAUTHORIZED` | "
            "`200: the service requires an API key; export ROM_AGENT_API_KEY` |"
        ) in report
        assert "ROM_AGENT_API_KEY" in out
        assert flags(url)["MAX_CONCURRENT"] == 6  # stage A never ran

        monkeypatch.setenv("ROM_AGENT_API_KEY", "not-the-key")
        code, out, report = rollout(url, tmp_path / "report.md", capsys)
        assert code == 1
        assert "`200: ROM_AGENT_API_KEY is not one of the service's API_KEYS`" in report

        monkeypatch.setenv("ROM_AGENT_API_KEY", "rollout-chat-key")
        target = Target(AdminClient(url, TOKEN), "rollout-chat-key")
        result = run_rollout(Context(target, Plan(), io.StringIO()), stages=())
        assert result.preflight is not None and result.preflight.passed
        row = "| P | chat route reachable with our API key (POST /api/chat) | PASS | `200` |"
        assert row in render_report(result)


def test_the_defaults_are_the_guides_values() -> None:
    args = build_parser().parse_args(["rollout"])
    assert (args.max_concurrent, args.max_queue, args.burst_delay_ms) == (5, 20, 3000)
    assert args.report == Path("STAGING_VALIDATION_REPORT.md")
