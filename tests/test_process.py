"""The service as a separate process: startup, restart, kill -9 and SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx

from tests.gates import wait_until
from tests.server import ServiceProcess

# A SIGTERM whose drain finished is a clean stop (uvicorn alone would end with -SIGTERM).
GRACEFUL_EXIT = (0,)


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db' / 'rom.db'}",
        "LOG_LEVEL": "warning",
        **extra,
    }


def test_conversation_survives_a_restart(tmp_path: Path) -> None:
    service = ServiceProcess(env_for(tmp_path), tmp_path).start()
    try:
        body = httpx.post(service.url + "/api/chat", json={"mensagem": "primeira"}).json()
    finally:
        assert service.stop() in GRACEFUL_EXIT
    again = ServiceProcess(env_for(tmp_path), tmp_path).start()
    try:
        stored = httpx.get(again.url + f"/api/conversations/{body['conversationId']}").json()
        assert next(m["content"] for m in stored["messages"]) == "primeira"
        assert len(stored["messages"]) == 2
    finally:
        again.stop()


def test_a_turn_that_got_200_survives_kill_9(tmp_path: Path) -> None:
    service = ServiceProcess(env_for(tmp_path), tmp_path).start()
    ids = []
    for i in range(20):
        response = httpx.post(service.url + "/api/chat", json={"message": f"durable {i}"})
        assert response.status_code == 200
        ids.append(response.json()["conversationId"])
    service.kill()
    again = ServiceProcess(env_for(tmp_path), tmp_path).start()
    try:
        for i, conversation_id in enumerate(ids):
            stored = httpx.get(again.url + f"/api/conversations/{conversation_id}").json()
            assert stored["messages"][0]["content"] == f"durable {i}"
            assert stored["messages"][1]["role"] == "assistant"
    finally:
        again.stop()


def test_bad_configuration_stops_the_process_naming_the_variable(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rom_agent", "serve"],
        env={**env_for(tmp_path), "PATH": "/usr/bin:/bin", "MAX_QUEUE": "lots"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "MAX_QUEUE" in result.stderr


def test_sigterm_drains_in_flight_requests_then_exits(tmp_path: Path) -> None:
    env = env_for(tmp_path, SIMULATOR_LATENCY_MS="1500", ENABLE_BOTTLENECK="true")
    service = ServiceProcess(env, tmp_path).start()
    results: list[httpx.Response] = []

    def slow_request() -> None:
        results.append(httpx.post(service.url + "/api/chat", json={"message": "slow"}, timeout=30))

    thread = threading.Thread(target=slow_request)
    thread.start()
    wait_until(lambda: "bottleneck_running 1.0" in httpx.get(service.url + "/metrics").text)
    assert service.process is not None
    service.process.send_signal(signal.SIGTERM)
    # While draining: not ready, and new chat requests are turned away.
    wait_until(lambda: httpx.get(service.url + "/ready").status_code == 503)
    assert httpx.get(service.url + "/ready").json()["status"] == "draining"
    refused = httpx.post(service.url + "/api/chat", json={"message": "late"})
    assert refused.status_code == 503 and refused.json()["code"] == "DRAINING"
    thread.join(timeout=30)
    assert [r.status_code for r in results] == [200]
    assert service.process.wait(timeout=30) in GRACEFUL_EXIT
    # The answered turn is on disk.
    again = ServiceProcess(env_for(tmp_path), tmp_path).start()
    try:
        conversation = results[0].json()["conversationId"]
        stored = httpx.get(again.url + f"/api/conversations/{conversation}").json()
        assert [m["role"] for m in stored["messages"]] == ["user", "assistant"]
    finally:
        again.stop()
