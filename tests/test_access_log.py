"""The access log: one JSON line per HTTP request, written in batches (rom_agent.logs.AccessLog)."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import signal
from pathlib import Path

import httpx
import orjson
import pytest
import structlog

from rom_agent.logs import AccessLog
from tests.server import ServiceProcess

GRACEFUL_EXIT = (0, -signal.SIGTERM)


class CountingStream(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes, /) -> int:  # type: ignore[override]
        self.writes += 1
        return super().write(data)


def access_lines(text: bytes) -> list[dict[str, object]]:
    entries = [orjson.loads(line) for line in text.splitlines() if line.startswith(b"{")]
    return [e for e in entries if e.get("event") == "request"]


def test_lines_of_one_loop_iteration_go_out_in_one_write_in_order() -> None:
    stream = CountingStream()
    log = AccessLog()
    log.direct(stream, enabled=True)

    async def serve_three() -> int:
        for n in range(3):
            log.request("GET", f"/r{n}", 200, 0.5, f"id-{n}")
        written_before_the_loop_turned = stream.writes
        await asyncio.sleep(0)  # one iteration: the scheduled flush runs
        return written_before_the_loop_turned

    assert asyncio.run(serve_three()) == 0
    assert stream.writes == 1
    lines = access_lines(stream.getvalue())
    assert [line["path"] for line in lines] == ["/r0", "/r1", "/r2"]
    assert lines[0] == {
        "method": "GET",
        "path": "/r0",
        "status": 200,
        "duration_ms": 0.5,
        "event": "request",
        "request_id": "id-0",
        "level": "info",
        "timestamp": lines[0]["timestamp"],
    }
    stamp = str(lines[0]["timestamp"])
    assert stamp.endswith("Z")  # the structlog TimeStamper(fmt="iso", utc=True) shape
    assert dt.datetime.fromisoformat(stamp).utcoffset() == dt.timedelta(0)


def test_what_the_request_bound_is_on_the_line_explicit_fields_win() -> None:
    stream = CountingStream()
    log = AccessLog()
    log.direct(stream, enabled=True)
    with structlog.contextvars.bound_contextvars(trace_id="t" * 32, status="bound"):
        log.request("GET", "/", 200, 1.0, "rid")
    (line,) = access_lines(stream.getvalue())
    assert line["trace_id"] == "t" * 32 and line["status"] == 200


def test_without_a_loop_a_line_is_written_at_once_and_off_above_info() -> None:
    stream = CountingStream()
    log = AccessLog()
    log.direct(stream, enabled=True)
    log.request("POST", "/x", 503, 0.1, "a")
    assert stream.writes == 1
    log.direct(stream, enabled=False)  # LOG_LEVEL above info
    log.request("POST", "/x", 503, 0.1, "b")
    assert [line["request_id"] for line in access_lines(stream.getvalue())] == ["a"]


@pytest.mark.parametrize("level", ["info", "warning"])
def test_the_served_process_logs_every_request_once(tmp_path: Path, level: str) -> None:
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'rom.db'}", "LOG_LEVEL": level}
    service = ServiceProcess(env, tmp_path).start()
    sent = {f"req-{n}": "/health" if n % 2 else "/no-such-route" for n in range(40)}
    try:

        async def send_all() -> list[int]:
            async with httpx.AsyncClient(base_url=service.url) as client:
                answers = await asyncio.gather(
                    *(client.get(path, headers={"X-Request-Id": rid}) for rid, path in sent.items())
                )
            return [a.status_code for a in answers]

        statuses = asyncio.run(send_all())
    finally:
        assert service.stop() in GRACEFUL_EXIT
    assert sorted(set(statuses)) == [200, 404]
    lines = [e for e in access_lines(service.log_path.read_bytes()) if e["request_id"] in sent]
    if level == "warning":
        assert lines == []
        return
    assert sorted(str(e["request_id"]) for e in lines) == sorted(sent)  # each exactly once
    for entry in lines:
        rid = str(entry["request_id"])
        assert entry["path"] == sent[rid]
        assert entry["status"] == (200 if sent[rid] == "/health" else 404)
        assert entry["method"] == "GET" and entry["level"] == "info"
        assert isinstance(entry["duration_ms"], float | int) and entry["duration_ms"] >= 0
