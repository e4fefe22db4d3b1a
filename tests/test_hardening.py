"""Issue 13: what a hostile or unlucky client (or operator) can do, over real HTTP.

Process tests run `python -m rom_agent serve` (uvicorn + uvloop + httptools, as production);
the others run the app under uvicorn in this process where a separate process is not needed.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from rom_agent.config import ConfigError, load_settings
from tests.gates import wait_until
from tests.server import ServiceProcess, isolated_settings, running_app

ADMIN = "a" * 40


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db' / 'rom.db'}",
        "KB_DIR": str(tmp_path / "kb"),
        "LOG_LEVEL": "info",
        **extra,
    }


def metric(url: str, line_prefix: str) -> float | None:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def log_events(text: str) -> list[dict]:
    """The JSON log lines of a service process (one object per line)."""
    events = []
    for line in text.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            events.append({"event": line, "level": "unparsed"})
    return events


def named(text: str, event: str) -> list[dict]:
    return [e for e in log_events(text) if event in str(e.get("event"))]


def send_and_leave(port: int, head: bytes, body: bytes) -> None:
    """A client that sends `head` and part of a body, then closes the connection."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head + body)


# ------------------------------------------------------------------ 1. SIGTERM drain


def test_sigterm_with_the_bottleneck_off_drains_running_requests_and_exits_0(
    tmp_path: Path,
) -> None:
    env = env_for(tmp_path, SIMULATOR_LATENCY_MS="1500", ENABLE_BOTTLENECK="false")
    service = ServiceProcess(env, tmp_path).start()
    results: list[httpx.Response] = []

    def slow_request() -> None:
        results.append(httpx.post(service.url + "/api/chat", json={"message": "slow"}, timeout=30))

    thread = threading.Thread(target=slow_request)
    thread.start()
    wait_until(lambda: httpx.get(service.url + "/ready").json()["checks"]["inFlight"] == 1)
    assert service.process is not None
    service.process.send_signal(signal.SIGTERM)
    wait_until(lambda: httpx.get(service.url + "/ready").status_code == 503)
    assert httpx.get(service.url + "/ready").json()["status"] == "draining"
    refused = httpx.post(service.url + "/api/chat", json={"message": "late"})
    assert refused.status_code == 503
    assert refused.json() == {
        "error": "service is shutting down; retry on another instance",
        "status": 503,
        "code": "DRAINING",
    }
    completion = httpx.post(
        service.url + "/v1/chat/completions",
        json={"model": "rom-sim-1", "messages": [{"role": "user", "content": "late"}]},
    )
    assert completion.status_code == 503 and completion.json()["error"]["code"] == "DRAINING"
    thread.join(timeout=30)
    assert [r.status_code for r in results] == [200]
    assert service.process.wait(timeout=30) == 0
    log = service.log_path.read_text()
    assert len(named(log, "drained")) == 1 and "Traceback" not in log


def test_a_drain_that_times_out_says_so_and_exits_1(tmp_path: Path) -> None:
    env = env_for(tmp_path, SIMULATOR_LATENCY_MS="20000", DRAIN_TIMEOUT_S="0.2")
    service = ServiceProcess(env, tmp_path).start()
    thread = threading.Thread(
        target=lambda: httpx.post(service.url + "/api/chat", json={"message": "x"}, timeout=30)
    )
    thread.start()
    wait_until(lambda: httpx.get(service.url + "/ready").json()["checks"]["inFlight"] == 1)
    assert service.process is not None
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(timeout=30) == 1
    thread.join(timeout=30)
    assert named(service.log_path.read_text(), "drain timed out")[0]["level"] == "warning"


# ------------------------------------------------------------------ 2. client gone mid-body


def test_a_client_leaving_during_its_upload_is_a_499_without_traceback(tmp_path: Path) -> None:
    service = ServiceProcess(env_for(tmp_path), tmp_path).start()
    try:
        head = (
            b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n"
        )
        send_and_leave(service.port, head, b'{"mensagem": "')
        counted = 'http_requests_total{route="/api/chat",status="499"}'
        wait_until(lambda: metric(service.url, counted) == 1.0)
        assert metric(service.url, 'http_requests_total{route="/api/chat",status="500"}') is None
    finally:
        assert service.stop() == 0
    log = service.log_path.read_text()
    assert "Traceback" not in log and "ClientDisconnect" not in log
    assert [e["status"] for e in named(log, "request") if e.get("path") == "/api/chat"] == [499]


# ------------------------------------------------------------------ 4. fault injection


def test_fault_injection_switched_on_at_runtime_warns_now_and_at_every_start(
    tmp_path: Path,
) -> None:
    env = env_for(tmp_path, ADMIN_TOKEN=ADMIN)
    service = ServiceProcess(env, tmp_path).start()
    try:
        changed = httpx.patch(
            service.url + "/admin/flags",
            headers={"x-admin-token": ADMIN},
            json={"ENABLE_FAULT_INJECTION": True},
        )
        assert changed.status_code == 200
    finally:
        service.stop()
    first = service.log_path.read_text()
    switched = named(first, "FAULT INJECTION SWITCHED ON")
    assert [e["level"] for e in switched] == ["warning"]

    # The environment still says false; the persisted override is what applies.
    again = ServiceProcess(env, tmp_path)
    again.log_path = tmp_path / "second.log"
    again._log = again.log_path.open("ab")
    again.start()
    again.stop()
    second = again.log_path.read_text()
    warning = named(second, "FAULT INJECTION IS ENABLED")
    assert [e["level"] for e in warning] == ["warning"]


# ------------------------------------------------------------------ 9. startup and shutdown


def run_serve(env: dict[str, str], cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rom_agent", "serve"],
        env={**__import__("os").environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_an_unusable_database_path_is_one_line_and_rc_2(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    env = env_for(tmp_path, DATABASE_URL=f"sqlite:///{tmp_path / 'a-file' / 'rom.db'}")
    result = run_serve(env, tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("rom-agent: DATABASE_URL: cannot open ")


def test_started_is_logged_only_once_the_port_is_bound(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_serve(env_for(tmp_path, PORT=str(port), HOST="127.0.0.1"), tmp_path)
    assert result.returncode != 0
    assert named(result.stderr, "started") == []
    assert "address already in use" in result.stderr.lower()


def test_ctrl_c_stops_cleanly_without_a_traceback(tmp_path: Path) -> None:
    service = ServiceProcess(env_for(tmp_path), tmp_path).start()
    assert service.stop(signal.SIGINT) == 0
    log = service.log_path.read_text()
    assert "KeyboardInterrupt" not in log and "Traceback" not in log
    assert len(named(log, "started")) == 1 and len(named(log, "stopped")) == 1


# ------------------------------------------------------------------ 6 and 8, in process


@pytest.fixture
def server(tmp_path: Path):
    settings = isolated_settings(tmp_path, admin_token=ADMIN, enable_fault_injection=True)
    with running_app(settings) as running:
        yield running


@pytest.mark.parametrize("raw", ["²", "٣", "3_0", " 3", "+3", "-1", "0", "1001", ""])
def test_integers_in_queries_are_ascii_digits_only(server, raw: str) -> None:
    with server.client() as client:
        response = client.get(
            "/admin/flags/history", params={"limit": raw}, headers={"x-admin-token": ADMIN}
        )
    assert response.status_code == 400, raw
    assert response.json()["code"] == "INVALID_REQUEST"


@pytest.mark.parametrize("header", ["status=٥٠٠", "delay_ms=١٠", "status=5_00"])
def test_integers_in_headers_are_ascii_digits_only(server, header: str) -> None:
    with server.client() as client:
        response = client.post(
            "/api/chat", json={"mensagem": "oi"}, headers={"x-fault": header.encode()}
        )
    assert response.status_code == 400, header
    assert "X-Fault" in response.json()["error"]


def test_the_first_non_null_of_mensagem_and_message_is_the_text(server) -> None:
    with server.client() as client:
        response = client.post("/api/chat", json={"mensagem": None, "message": "oi"})
    assert response.status_code == 200, response.text
    assert "oi" in response.json()["response"]


@pytest.mark.parametrize("conversation_id", [".", ".."])
def test_dot_conversation_ids_are_refused(server, conversation_id: str) -> None:
    with server.client() as client:
        response = client.post(
            "/api/chat", json={"mensagem": "oi", "conversationId": conversation_id}
        )
    assert response.status_code == 400
    assert "'.'" in response.json()["error"]


@pytest.mark.parametrize("value", ["1e-300", "0.001", "0"])
def test_durations_have_a_floor(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="CIRCUIT_BREAKER_COOLDOWN_S"):
        load_settings(_env_file=None, circuit_breaker_cooldown_s=value)


def test_a_runtime_duration_below_the_floor_is_refused(server) -> None:
    with server.client() as client:
        response = client.patch(
            "/admin/flags",
            json={"QUEUE_TIMEOUT_S": 1e-300},
            headers={"x-admin-token": ADMIN},
        )
    assert response.status_code == 400
    assert "QUEUE_TIMEOUT_S" in response.json()["error"]


# ------------------------------------------------------------------ 7. client gone mid-answer


def test_a_client_leaving_a_non_streamed_chat_cancels_it_and_nothing_is_stored(
    tmp_path: Path,
) -> None:
    settings = isolated_settings(
        tmp_path, simulator_latency_ms=30_000, enable_bottleneck=True, max_concurrent=1
    )
    with running_app(settings) as running:
        port = int(running.url.rsplit(":", 1)[1])
        body = b'{"mensagem": "oi", "conversationId": "left-early"}'
        head = (
            b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(head + body)
            wait_until(lambda: running.services.in_flight.running == 1)
        # Well before the model's 30 s: the call was cancelled and the slot freed.
        wait_until(lambda: running.services.in_flight.running == 0, timeout=5)
        assert running.services.bottleneck.running == 0
        counted = 'http_requests_total{route="/api/chat",status="499"}'
        assert metric(running.url, counted) == 1.0
        with running.client() as client:
            assert client.get("/api/conversations/left-early").status_code == 404


# ------------------------------------------------------------------ 5. connection limits


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def status_and_body(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory):
    tmp_path = tmp_path_factory.mktemp("limits")
    env = env_for(
        tmp_path,
        HEADER_TIMEOUT_S="0.5",
        BODY_TIMEOUT_S="0.5",
        KEEPALIVE_TIMEOUT_S="0.5",
        MAX_HEADER_BYTES="16384",
    )
    service = ServiceProcess(env, tmp_path).start()
    yield service
    service.stop()


def connect(service: ServiceProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", service.port))
    sock.settimeout(10)  # far above the limits under test: a hang fails instead of blocking
    return sock


def test_oversized_headers_are_a_431_and_the_connection_closes(limited) -> None:
    with connect(limited) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n")
        status, body = status_and_body(read_all(sock))
    assert status == 431
    assert body["code"] == "HEADERS_TOO_LARGE" and body["status"] == 431
    # Just under the limit is fine.
    ok = httpx.get(limited.url + "/health", headers={"x-big": "a" * 15_000})
    assert ok.status_code == 200


def test_headers_that_never_finish_are_a_408(limited) -> None:
    with connect(limited) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # no blank line: never complete
        status, body = status_and_body(read_all(sock))
    assert (status, body["code"]) == (408, "REQUEST_TIMEOUT")


def test_a_connection_that_sends_nothing_is_closed(limited) -> None:
    with connect(limited) as sock:
        raw = read_all(sock)
    assert status_and_body(raw)[0] == 408


def test_a_body_shorter_than_its_content_length_is_a_408(limited) -> None:
    with connect(limited) as sock:
        sock.sendall(
            b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n" + b'{"mensagem": "'
        )
        status, body = status_and_body(read_all(sock))
    assert (status, body["code"]) == (408, "REQUEST_TIMEOUT")


def test_an_idle_keep_alive_connection_is_closed(limited) -> None:
    with connect(limited) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = read_all(sock)  # the answer, then the close once idle
    assert raw.startswith(b"HTTP/1.1 200")


def test_a_malformed_request_gets_the_json_error_body(limited) -> None:
    with connect(limited) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
        status, body = status_and_body(read_all(sock))
    assert (status, body["code"]) == (400, "INVALID_REQUEST")
