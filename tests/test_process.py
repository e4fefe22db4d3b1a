"""The service as a separate process: startup, restart, kill -9 and SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.server import ServiceProcess

# uvicorn re-raises the captured SIGTERM after its graceful shutdown.
GRACEFUL_EXIT = (0, -signal.SIGTERM)


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


def test_startup_time_is_reported(tmp_path: Path) -> None:
    service = ServiceProcess(env_for(tmp_path), tmp_path).start()
    try:
        assert service.started_in_s is not None
        print(f"\nserve -> first 200 on /health: {service.started_in_s:.2f} s")
    finally:
        service.stop()
