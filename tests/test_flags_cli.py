"""`rom-agent flags get|set|unset` against a real server, and the admin client's safety."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import orjson
import pytest
import structlog

from rom_agent.cli import main
from rom_agent.ops.client import AdminClient, ApiCallError
from tests.server import RunningApp, free_port, isolated_settings
from tests.test_admin_api import TOKEN, admin_server


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningApp]:
    monkeypatch.setenv("ADMIN_TOKEN", TOKEN)
    # The server logs to stdout by default; keep its lines out of the CLI's output.
    with (
        structlog.testing.capture_logs(),
        admin_server(isolated_settings(tmp_path, admin_token=TOKEN)) as running,
    ):
        yield running


def flags(server: RunningApp, *args: str) -> int:
    command, *rest = args
    return main(["flags", command, "--url", server.url, *rest])


def test_get_prints_a_table_of_every_flag(
    server: RunningApp, capsys: pytest.CaptureFixture[str]
) -> None:
    assert flags(server, "get") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["KEY", "VALUE", "SOURCE"]
    assert "ENABLE_CIRCUIT_BREAKER false default".split() in [line.split() for line in lines]
    assert "MODEL_CHAIN simulator/rom-sim-1,simulator/rom-sim-2 default".split() in [
        line.split() for line in lines
    ]


def test_get_one_key_as_json(server: RunningApp, capsys: pytest.CaptureFixture[str]) -> None:
    assert flags(server, "get", "max_queue", "--json") == 0
    assert orjson.loads(capsys.readouterr().out) == {
        "key": "MAX_QUEUE",
        "value": 20,
        "source": "default",
    }
    assert flags(server, "get", "NOT_A_FLAG") == 1
    assert "unknown flag NOT_A_FLAG" in capsys.readouterr().err


def test_set_and_unset_change_the_running_service(
    server: RunningApp, capsys: pytest.CaptureFixture[str]
) -> None:
    assert flags(server, "set", "ENABLE_CIRCUIT_BREAKER=true", "MAX_CONCURRENT=6") == 0
    out = capsys.readouterr().out
    assert "ENABLE_CIRCUIT_BREAKER  false -> true  (now runtime)" in out
    assert "MAX_CONCURRENT          5 -> 6  (now runtime)" in out
    current = server.services.flags.current
    assert current.enable_circuit_breaker is True and current.max_concurrent == 6

    assert flags(server, "unset", "ENABLE_CIRCUIT_BREAKER") == 0
    assert "ENABLE_CIRCUIT_BREAKER  true -> false  (now default)" in capsys.readouterr().out
    assert server.services.flags.current.enable_circuit_breaker is False

    assert flags(server, "unset", "ENABLE_CIRCUIT_BREAKER") == 1
    err = capsys.readouterr().err
    assert "no runtime override for ENABLE_CIRCUIT_BREAKER (HTTP 404 NOT_FOUND)" in err


def test_set_prints_the_servers_refusal_and_changes_nothing(
    server: RunningApp, capsys: pytest.CaptureFixture[str]
) -> None:
    assert flags(server, "set", "ENABLE_BOTTLENECK=true", "MAX_QUEUE=lots") == 1
    err = capsys.readouterr().err
    assert "MAX_QUEUE" in err and "(HTTP 400 INVALID_REQUEST)" in err
    assert server.services.flags.current.enable_bottleneck is False


def test_usage_errors_exit_2(server: RunningApp, capsys: pytest.CaptureFixture[str]) -> None:
    assert flags(server, "set", "MAX_QUEUE") == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert flags(server, "get", "--url", "ftp://example.org") == 2


def test_a_missing_or_wrong_token_fails_without_printing_it(
    server: RunningApp, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = TOKEN[::-1]
    assert flags(server, "get", "--token", wrong) == 1
    out, err = capsys.readouterr()
    assert "(HTTP 401 UNAUTHORIZED)" in err
    assert wrong not in out + err and TOKEN not in out + err

    monkeypatch.delenv("ADMIN_TOKEN")
    assert flags(server, "get") == 2
    assert "no admin token" in capsys.readouterr().err


def test_url_defaults_to_rom_agent_url(
    server: RunningApp, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROM_AGENT_URL", server.url)
    assert main(["flags", "get", "ENABLE_RETRY", "--json"]) == 0
    assert orjson.loads(capsys.readouterr().out)["value"] is True


def test_an_unreachable_service_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["flags", "get", "--url", url, "--token", TOKEN]) == 1
    assert f"cannot reach {url}" in capsys.readouterr().err


def test_the_console_command_runs_as_a_process(server: RunningApp) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rom_agent", "flags", "set", "MAX_QUEUE=25", "--url", server.url],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "MAX_QUEUE" in result.stdout
    assert server.services.flags.current.max_queue == 25


def test_the_client_never_follows_a_redirect_with_the_token() -> None:
    seen_tokens: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/elsewhere"):
                seen_tokens.append(self.headers.get("X-Admin-Token"))
                self.send_response(200)
                self.end_headers()
                return
            self.send_response(307)
            self.send_header("Location", f"http://127.0.0.1:{port}/elsewhere")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        with pytest.raises(ApiCallError, match=r"redirected to .*/elsewhere") as failed:
            AdminClient(f"http://127.0.0.1:{port}", TOKEN).get_flags()
        assert failed.value.status == 307
        assert TOKEN not in str(failed.value)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert seen_tokens == []
