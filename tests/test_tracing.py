"""OpenTelemetry tracing over real HTTP: the gateway under uvicorn, real OpenAI-compatible
provider calls to a fake upstream, spans captured by the SDK's in-memory exporter.

Tracing is switched on the production way (OTEL_EXPORTER_OTLP_ENDPOINT set); only the exporter
is swapped for the in-memory one."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from rom_agent.instrumentation import tracing
from tests.fakes import Behaviour
from tests.fakes.openai_server import FakeOpenAI
from tests.server import ServiceProcess
from tests.stream_harness import gateway, threaded_fake

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = "00f067aa0ba902b7"


@pytest.fixture
def exporter(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")  # never called
    monkeypatch.setattr(tracing, "provider_from_environment", lambda: provider)
    yield exporter
    provider.shutdown()


def show(spans: list[ReadableSpan]) -> str:
    """The trace as the note prints it: one line per span, children indented."""
    by_parent: dict[int | None, list[ReadableSpan]] = {}
    ids = {span.context.span_id for span in spans}
    for span in spans:
        parent = span.parent.span_id if span.parent and span.parent.span_id in ids else None
        by_parent.setdefault(parent, []).append(span)
    lines: list[str] = []

    def walk(parent: int | None, depth: int) -> None:
        for span in sorted(by_parent.get(parent, []), key=lambda s: s.start_time or 0):
            ms = ((span.end_time or 0) - (span.start_time or 0)) / 1e6
            attrs = json.dumps(dict(span.attributes or {}), sort_keys=True)
            lines.append(
                f"{'  ' * depth}{span.name} [{span.kind.name}, {ms:.1f} ms, "
                f"{span.status.status_code.name}] {attrs}"
            )
            for event in span.events:
                lines.append(f"{'  ' * depth}  · event {event.name} {dict(event.attributes or {})}")
            walk(span.context.span_id, depth + 1)

    walk(None, 0)
    return "\n".join(lines)


def test_a_request_with_a_retry_and_a_fallback_is_one_trace(
    tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    with (
        threaded_fake(FakeOpenAI) as fake,
        gateway(
            tmp_path, fake, enable_circuit_breaker=True, enable_bottleneck=True, max_retries=2
        ) as app,
    ):
        fake.script([Behaviour(status=503)] * 5, model="primary")
        with app.client() as client:
            response = client.post(
                "/api/chat",
                json={"message": "hello"},
                headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"},
            )
        assert response.status_code == 200, response.text
        request_id = response.headers["x-request-id"]
        upstream = [
            (r.model, r.headers.get("traceparent") or r.headers.get("Traceparent"))
            for r in fake.requests
        ]

    spans = exporter.get_finished_spans()
    print("\n" + show(list(spans)))
    server = [s for s in spans if s.name == "POST /api/chat"]
    assert len(server) == 1
    root = server[0]
    # The client's trace continues: same trace id, its span is our parent.
    assert format(root.context.trace_id, "032x") == CLIENT_TRACE
    assert root.parent is not None and format(root.parent.span_id, "016x") == CLIENT_PARENT
    assert root.attributes["rom.request_id"] == request_id
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["rom.admission.queued"] is False
    assert root.attributes["rom.admission.wait_s"] >= 0

    attempts = sorted(
        (s for s in spans if s.name.startswith("chat ")), key=lambda s: s.start_time or 0
    )
    assert [s.name for s in attempts] == [*["chat primary"] * 3, "chat backup"]
    assert all(s.parent and s.parent.span_id == root.context.span_id for s in attempts)
    first, retry, _, fallback = (dict(s.attributes or {}) for s in attempts)
    assert first["gen_ai.request.model"] == "primary"
    assert {a["rom.request_id"] for a in (first, retry, fallback)} == {request_id}
    assert first["gen_ai.provider.name"] == "openai"
    assert first["rom.retry.number"] == 0 and first["error.type"] == "error"
    assert retry["rom.retry.number"] == 1 and retry["rom.retry.reason"] == "error"
    assert fallback["rom.fallback.from"] == "primary"
    assert fallback["rom.fallback.to"] == "backup"
    assert fallback["rom.breaker.state"] == "CLOSED"
    assert fallback["gen_ai.response.model"] == "backup"
    assert fallback["gen_ai.usage.input_tokens"] > 0
    assert fallback["gen_ai.usage.output_tokens"] > 0
    assert "rom.fallback.from" not in first and "rom.fallback.from" not in retry

    # Each upstream call carried its own attempt span as parent (W3C traceparent).
    assert [model for model, _ in upstream] == ["primary", "primary", "primary", "backup"]
    for (_, header), span in zip(upstream, attempts, strict=True):
        assert header == (f"00-{CLIENT_TRACE}-{format(span.context.span_id, '016x')}-01"), header


def test_a_streamed_answer_has_its_attempt_span_with_usage(
    tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    with threaded_fake(FakeOpenAI) as fake, gateway(tmp_path, fake) as app, app.client() as client:
        with client.stream("POST", "/api/chat/stream", json={"message": "hi"}) as response:
            body = response.read()
        assert response.status_code == 200 and b'"type":"done"' in body.replace(b" ", b"")
    spans = exporter.get_finished_spans()
    (root,) = (s for s in spans if s.name == "POST /api/chat/stream")
    (attempt,) = (s for s in spans if s.name == "chat primary")
    assert attempt.parent is not None and attempt.parent.span_id == root.context.span_id
    assert attempt.attributes["gen_ai.usage.output_tokens"] > 0
    assert attempt.attributes["rom.attempt.outcome"] == "success"
    assert attempt.attributes["rom.time_to_first_token_s"] > 0


def test_tracing_off_imports_no_opentelemetry(tmp_path: Path) -> None:
    """Off by default: a real request through the app, our tracing never loaded."""
    code = f"""
import os, sys
os.environ.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
os.environ.pop("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", None)
from tests.server import isolated_settings, running_app
from pathlib import Path
settings = isolated_settings(Path({str(tmp_path)!r}))
with running_app(settings) as app, app.client() as client:
    assert client.post("/api/chat", json={{"message": "hi"}}).status_code == 200
# Libraries import the OpenTelemetry API on their own when it is installed (redis-py's
# observability, unconfigured so inert); our tracing module and the SDK's tracer never load.
loaded = sorted(
    name for name in sys.modules
    if name == "rom_agent.instrumentation.tracing" or name.startswith("opentelemetry.sdk.trace")
)
assert not loaded, loaded
"""
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_otlp_export_from_a_real_server_process_and_logs_join_the_trace(tmp_path: Path) -> None:
    """`rom-agent serve` with OTEL_EXPORTER_OTLP_ENDPOINT pointing at a local OTLP/HTTP
    receiver: the spans arrive as protobuf, and the request's log line carries both the request
    id and the trace id."""
    received: list[bytes] = []
    arrived = threading.Event()

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(body)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()
            arrived.set()

        def log_message(self, *args: object) -> None:
            pass

    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
        "KB_DIR": str(tmp_path / "kb"),
        "LOG_LEVEL": "info",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.server_port}",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    service = ServiceProcess(env, tmp_path).start()
    try:
        response = httpx.post(
            service.url + "/api/chat",
            json={"message": "hello"},
            headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"},
        )
        assert response.status_code == 200
        assert arrived.wait(30), "no OTLP export arrived"
    finally:
        service.stop()
        receiver.shutdown()
    request_id = response.headers["x-request-id"]

    spans = []
    for body in received:
        export = ExportTraceServiceRequest.FromString(body)
        for resource in export.resource_spans:
            service_name = {a.key: a.value.string_value for a in resource.resource.attributes}
            assert service_name["service.name"] == "rom-agent"
            spans += [span for scope in resource.scope_spans for span in scope.spans]
    names = {span.name for span in spans}
    assert {"POST /api/chat", "chat rom-sim-1"} <= names, names
    ours = [span for span in spans if span.trace_id.hex() == CLIENT_TRACE]
    assert {span.name for span in ours} == {"POST /api/chat", "chat rom-sim-1"}, ours

    lines = [json.loads(line) for line in service.log_path.read_text().splitlines() if "{" in line]
    joined = [line for line in lines if line.get("request_id") == request_id]
    assert joined and all(line.get("trace_id") == CLIENT_TRACE for line in joined), joined
