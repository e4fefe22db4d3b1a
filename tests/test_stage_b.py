"""The staging guide's stage B, end to end over HTTP on a real server (SPEC §4, §7, §8)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from rom_agent.app import create_services
from rom_agent.resilience.clock import FakeClock
from tests.recording_simulator import RecordingSimulator
from tests.server import isolated_settings, running_app

_STATE = re.compile(
    r'^circuit_breaker_state\{model="([^"]+)",operation="converse",state="(\w+)"\} (\S+)$', re.M
)


def states(client: httpx.Client) -> dict[str, tuple[str, float]]:
    text = client.get("/metrics").text
    return {model: (state, float(value)) for model, state, value in _STATE.findall(text)}


def test_breaker_cycle_closed_open_half_open_closed(tmp_path: Path) -> None:
    # Time moves only when the test says so; no sleeper is pending while it does (no request
    # is in flight), so advancing from this thread is safe.
    clock = FakeClock(autoadvance=False)
    settings = isolated_settings(
        tmp_path,
        enable_circuit_breaker=True,
        enable_fault_injection=True,
        circuit_breaker_cooldown_s=30,
    )
    simulator = RecordingSimulator()
    services = create_services(settings, clock=clock, providers={"simulator": simulator})
    with running_app(settings, services) as server, server.client() as client:
        # 4.1 initial state: CLOSED, value 0, before any request.
        assert states(client) == {"rom-sim-1": ("CLOSED", 0.0), "rom-sim-2": ("CLOSED", 0.0)}

        # 4.2 five forced failures.
        for i in range(1, 6):
            response = client.post(
                "/api/chat", json={"mensagem": f"FORCE_ERROR_{i}", "conversationId": f"cb-test-{i}"}
            )
            assert response.status_code == 502
            assert response.json()["code"] == "UPSTREAM_FAILED"
            assert "rom-sim-1" in response.json()["error"]

        # 4.3 OPEN, value 2; a normal request is now rejected fast without an upstream call.
        assert states(client)["rom-sim-1"] == ("OPEN", 2.0)
        calls_before = len(simulator.calls)
        rejected = client.post("/api/chat", json={"mensagem": "oi"})
        assert rejected.status_code == 503
        assert rejected.json()["code"] == "CIRCUIT_OPEN"
        assert int(rejected.headers["retry-after"]) == 30
        assert len(simulator.calls) == calls_before

        # 4.4/4.5 the cooldown passes: HALF_OPEN, value 1, with no request sent.
        clock.advance(29.9)
        assert states(client)["rom-sim-1"] == ("OPEN", 2.0)
        clock.advance(0.2)
        assert states(client)["rom-sim-1"] == ("HALF_OPEN", 1.0)

        # 4.6/4.7 one normal request closes it again.
        recovery = client.post(
            "/api/chat", json={"mensagem": "Teste recuperação", "conversationId": "cb-recovery"}
        )
        assert recovery.status_code == 200
        assert recovery.json()["modelUsed"] == "rom-sim-1"
        assert states(client)["rom-sim-1"] == ("CLOSED", 0.0)

        text = client.get("/metrics").text
        for transition in (
            'from="CLOSED",model="rom-sim-1",operation="converse",to="OPEN"} 1.0',
            'from="OPEN",model="rom-sim-1",operation="converse",to="HALF_OPEN"} 1.0',
            'from="HALF_OPEN",model="rom-sim-1",operation="converse",to="CLOSED"} 1.0',
        ):
            assert "circuit_breaker_transitions_total{" + transition in text
        assert 'circuit_breaker_failure_total{model="rom-sim-1",operation="converse"} 5.0' in text
        assert 'circuit_breaker_rejected_total{model="rom-sim-1",operation="converse"} 1.0' in text
        assert 'model_fallback_success_total{model="rom-sim-1",operation="converse"} 1.0' in text
        assert 'model_fallback_exhausted_total{operation="converse"} 5.0' in text


def test_force_error_is_ordinary_text_without_fault_injection(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path, enable_circuit_breaker=True)
    with running_app(settings) as server, server.client() as client:
        for i in range(6):
            assert (
                client.post("/api/chat", json={"mensagem": f"FORCE_ERROR_{i}"}).status_code == 200
            )
        assert states(client)["rom-sim-1"] == ("CLOSED", 0.0)


def test_with_the_breaker_flag_off_nothing_opens(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path, enable_fault_injection=True)
    with running_app(settings) as server, server.client() as client:
        for i in range(8):
            assert (
                client.post("/api/chat", json={"mensagem": f"FORCE_ERROR_{i}"}).status_code == 502
            )
        assert states(client)["rom-sim-1"] == ("CLOSED", 0.0)
        assert 'circuit_breaker_failure_total{model="rom-sim-1",operation="converse"} 0.0' in (
            client.get("/metrics").text
        )


def test_x_fault_header_drives_a_fallback(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path, enable_fault_injection=True, enable_retry=False)
    with running_app(settings) as server, server.client() as client:
        response = client.post(
            "/api/chat",
            json={"mensagem": "hello"},
            headers={"X-Fault": "status=503;models=rom-sim-1"},
        )
        assert response.status_code == 200
        assert response.json()["modelUsed"] == "rom-sim-2"
        assert response.json()["fallbackUsed"] is True
        bad = client.post("/api/chat", json={"mensagem": "x"}, headers={"X-Fault": "bogus"})
        assert bad.status_code == 400 and "X-Fault" in bad.json()["error"]
