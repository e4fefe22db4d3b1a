"""/api/chat and the service basics over real HTTP (uvicorn on a loopback port)."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

from rom_agent.app import create_services
from tests.recording_simulator import RecordingSimulator
from tests.server import isolated_settings, running_app


@pytest.fixture
def simulator() -> RecordingSimulator:
    return RecordingSimulator()


@pytest.fixture
def server(tmp_path: Path, simulator: RecordingSimulator):
    settings = isolated_settings(tmp_path, history_max_messages=4)
    services = create_services(settings, providers={"simulator": simulator})
    with running_app(settings, services) as running:
        yield running


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "status", "code"}
    assert body["status"] == status and body["code"] == code
    assert isinstance(body["error"], str) and body["error"]
    return body


def test_chat_round_trip_accepts_mensagem_and_message(server) -> None:
    with server.client() as client:
        first = client.post("/api/chat", json={"mensagem": "Olá, tudo bem com você?"})
        assert first.status_code == 200
        body = first.json()
        assert body["modelUsed"] == "rom-sim-1"
        assert body["fallbackUsed"] is False
        assert body["attempts"] == 1
        assert "rom-sim-1" in body["response"] and "Olá" in body["response"]
        usage = body["usage"]
        assert usage["totalTokens"] == usage["inputTokens"] + usage["outputTokens"] > 0
        assert body["conversationId"].startswith("conv-")
        assert isinstance(body["latencyMs"], int) and body["toolsUsed"] == []

        second = client.post(
            "/api/chat", json={"message": "Hello there", "conversationId": body["conversationId"]}
        )
        assert second.status_code == 200
        assert second.json()["conversationId"] == body["conversationId"]
        assert "Hello! This is rom-sim-1" in second.json()["response"]

        stored = client.get(f"/api/conversations/{body['conversationId']}").json()
        roles = [m["role"] for m in stored["messages"]]
        assert roles == ["user", "assistant", "user", "assistant"]
        assert stored["messages"][0]["content"] == "Olá, tudo bem com você?"
        assert stored["messages"][1]["model"] == "rom-sim-1"


def test_history_is_sent_to_the_model_up_to_the_limit(server, simulator) -> None:
    with server.client() as client:
        for i in range(4):
            client.post("/api/chat", json={"message": f"turn {i}", "conversationId": "c-1"})
    # HISTORY_MAX_MESSAGES=4: the 4th turn sees the two previous turns (4 messages) + itself.
    last = simulator.calls[-1]
    texts = [m.plain_text for m in last.messages]
    assert texts[0] == "turn 1" and texts[2] == "turn 2" and texts[-1] == "turn 3"
    assert len(last.messages) == 5
    assert [m.role for m in last.messages] == ["user", "assistant", "user", "assistant", "user"]


def test_requested_model_goes_first(server, simulator) -> None:
    with server.client() as client:
        response = client.post("/api/chat", json={"message": "hi", "model": "rom-sim-2"})
        assert response.json()["modelUsed"] == "rom-sim-2"
        response = client.post("/api/chat", json={"message": "hi", "model": "simulator/rom-sim-2"})
        assert response.json()["modelUsed"] == "rom-sim-2"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b"{}", "is required"),
        (b'{"mensagem": ""}', "must not be empty"),
        (b'{"mensagem": "   "}', "must not be empty"),
        (b'{"mensagem": 42}', "must be a string"),
        (b'{"mensagem": null}', "is required"),
        (b'{"mensagem": "x", "conversationId": "bad id!"}', "conversationId"),
        (b'{"mensagem": "x", "conversationId": 7}', "conversationId"),
        (b'{"mensagem": "x", "conversationId": ""}', "conversationId"),
        (b'{"mensagem": "x", "model": "gpt-17"}', "unknown model"),
        (b'{"mensagem": "x", "model": ["rom-sim-1"]}', "must be a string"),
    ],
)
def test_invalid_requests_are_400_in_the_spec_format(server, body: bytes, fragment: str) -> None:
    with server.client() as client:
        response = client.post(
            "/api/chat", content=body, headers={"content-type": "application/json"}
        )
    assert fragment in assert_error(response, 400, "INVALID_REQUEST")["error"]


def test_message_over_the_limit_is_400(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path, max_message_chars=10)
    with running_app(settings) as server, server.client() as client:
        response = client.post("/api/chat", json={"message": "x" * 11})
        assert "exceeds 10 characters" in assert_error(response, 400, "INVALID_REQUEST")["error"]
        assert client.post("/api/chat", json={"message": "x" * 10}).status_code == 200


def test_oversized_body_is_413_by_declared_length(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path, max_body_bytes=2048)
    with running_app(settings) as server, server.client() as client:
        response = client.post("/api/chat", content=b"x" * 4096)
        assert_error(response, 413, "BODY_TOO_LARGE")


def test_oversized_chunked_body_is_refused_before_it_is_all_sent(tmp_path: Path) -> None:
    """No Content-Length: the server counts bytes and answers 413 mid-upload."""
    settings = isolated_settings(tmp_path, max_body_bytes=2048)
    with running_app(settings) as server:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            chunk = b"x" * 1024
            for _ in range(4):  # 4 KiB of a body that would never end
                sock.sendall(b"400\r\n" + chunk + b"\r\n")
            reply = b""
            while not reply.endswith(b"}"):
                data = sock.recv(65536)
                if not data:
                    break
                reply += data
        assert reply.startswith(b"HTTP/1.1 413")
        assert b'"code":"BODY_TOO_LARGE"' in reply


def test_unknown_route_and_method_use_the_spec_format(server) -> None:
    with server.client() as client:
        assert_error(client.get("/nope"), 404, "NOT_FOUND")
        assert_error(client.get("/api/chat"), 405, "METHOD_NOT_ALLOWED")
        assert_error(client.get("/api/conversations/unknown-id"), 404, "NOT_FOUND")


def test_request_id_is_returned_and_propagated(server) -> None:
    with server.client() as client:
        generated = client.get("/health").headers["x-request-id"]
        assert len(generated) == 16
        echoed = client.get("/health", headers={"X-Request-Id": "abc-123"})
        assert echoed.headers["x-request-id"] == "abc-123"
        # A hostile id is replaced, never reflected.
        hostile = client.get("/health", headers={"X-Request-Id": 'a"b<script>'})
        assert hostile.headers["x-request-id"] != 'a"b<script>'


def test_health_and_ready(server) -> None:
    with server.client() as client:
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["version"] and health["uptime"] >= 0
        ready = client.get("/ready")
        assert ready.status_code == 200
        assert ready.json()["status"] == "ready"
        assert ready.json()["checks"]["database"]["ok"] is True


def test_ready_is_503_while_draining(server) -> None:
    server.services.bottleneck.start_draining()
    with server.client() as client:
        response = client.get("/ready")
    assert response.status_code == 503
    assert response.json()["status"] == "draining"


def test_metrics_endpoint_and_disabling_it(tmp_path: Path) -> None:
    with running_app(isolated_settings(tmp_path)) as server, server.client() as client:
        client.post("/api/chat", json={"message": "hi"})
        text = client.get("/metrics").text
        assert 'http_requests_total{route="/api/chat",status="200"} 1.0' in text
        assert "circuit_breaker_success_total" in text
    with running_app(isolated_settings(tmp_path, enable_metrics=False)) as server:
        with server.client() as client:
            client.post("/api/chat", json={"message": "hi"})
            assert_error(client.get("/metrics"), 404, "NOT_FOUND")
        registry = server.services.metrics.registry
        assert (
            registry.get_sample_value(
                "http_requests_total", {"route": "/api/chat", "status": "200"}
            )
            is None
        )


def test_api_keys_protect_chat_routes(tmp_path: Path) -> None:
    import hashlib

    digest = hashlib.sha256(b"second-key").hexdigest()
    settings = isolated_settings(tmp_path, api_keys=f"first-key,sha256:{digest}")
    with running_app(settings) as server, server.client() as client:
        assert_error(client.post("/api/chat", json={"message": "hi"}), 401, "UNAUTHORIZED")
        wrong = client.post(
            "/api/chat", json={"message": "hi"}, headers={"Authorization": "Bearer nope"}
        )
        assert_error(wrong, 401, "UNAUTHORIZED")
        for key in ("first-key", "second-key"):
            ok = client.post(
                "/api/chat", json={"message": "hi"}, headers={"Authorization": f"Bearer {key}"}
            )
            assert ok.status_code == 200
        assert client.get("/health").status_code == 200  # never behind the key
