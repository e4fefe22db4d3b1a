"""Gateway CPU per request with OpenTelemetry tracing off vs on (OTLP/HTTP export to a local
receiver), on loopback.

Two `rom-agent serve` processes (simulator chain, no upstream latency): one without
OTEL_EXPORTER_OTLP_ENDPOINT, one with it pointing at a receiver in this process that accepts
and drops the exports. Each gets the same closed-loop load (CONNECTIONS clients, keep-alive);
the gateway process's own CPU time (utime + stime from /proc, export thread included) is
divided by the requests it answered. Rounds alternate off/on; the median is reported.

    .venv/bin/python bench/tracing_overhead.py [--requests 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.server
import os
import statistics
import sys
import tempfile
import threading
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.server import ServiceProcess  # noqa: E402

CONNECTIONS = 4
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


class Sink(http.server.BaseHTTPRequestHandler):
    exports = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        Sink.exports += 1
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def load(url: str, requests: int) -> int:
    per_client = requests // CONNECTIONS

    def client(_: int) -> int:
        ok = 0
        with httpx.Client(base_url=url, timeout=30) as http:
            for _ in range(per_client):
                ok += http.post("/api/chat", json={"message": "hello"}).status_code == 200
        return ok

    with concurrent.futures.ThreadPoolExecutor(CONNECTIONS) as pool:
        return sum(pool.map(client, range(CONNECTIONS)))


def measure(service: ServiceProcess, requests: int) -> float:
    assert service.process is not None
    load(service.url, 200)  # warm-up
    before = cpu_s(service.process.pid)
    answered = load(service.url, requests)
    after = cpu_s(service.process.pid)
    assert answered == requests - requests % CONNECTIONS, answered
    return (after - before) / answered * 1000  # ms per request


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sink = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    results: dict[str, list[float]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as tmp:
        base = {
            "LOG_LEVEL": "warning",
            "DATABASE_URL": f"sqlite:///{tmp}/db.sqlite",
            "KB_DIR": f"{tmp}/kb",
        }
        traced = {**base, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.server_port}"}
        services = {
            "off": ServiceProcess(base, Path(tmp)).start(),
            "on": ServiceProcess(
                {**traced, "DATABASE_URL": f"sqlite:///{tmp}/db2.sqlite"}, Path(tmp)
            ).start(),
        }
        try:
            for _ in range(args.rounds):
                for name in ("off", "on"):
                    results[name].append(measure(services[name], args.requests))
        finally:
            for service in services.values():
                service.stop()
    off, on = statistics.median(results["off"]), statistics.median(results["on"])
    print(f"requests per round: {args.requests}, rounds: {args.rounds}, clients: {CONNECTIONS}")
    print(
        f"tracing off: {off:.3f} ms CPU/request  (rounds: {[round(x, 3) for x in results['off']]})"
    )
    print(f"tracing on:  {on:.3f} ms CPU/request  (rounds: {[round(x, 3) for x in results['on']]})")
    print(
        f"cost of tracing: +{on - off:.3f} ms CPU/request (+{(on / off - 1) * 100:.0f} %); "
        f"OTLP export batches received: {Sink.exports}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
